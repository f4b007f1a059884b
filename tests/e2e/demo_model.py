#!/usr/bin/python3
"""Tests of the demo model (demo/model) and the VQA harness (tools/eval_vqa.py).

    demo_model.py cases    RUN MODEL CASES          sample cases answered correctly, image
                                                    tokens routed to their modality's expert
    demo_model.py oracle   RUN MODEL CASES OUTDIR   medmoe-run == tests/reference/medmoe_ref.py
                                                    on one case (compare.py, tol 1e-3)
    demo_model.py trainfwd MODEL CASES              tools/train_demo.py's training forward ==
                                                    the oracle's forward (logits after the prompt)
    demo_model.py formats  RUN MODEL CASES OUTDIR   eval_vqa.py on small VQA-RAD / SLAKE /
                                                    PathVQA / JSON-lines files + metric unit checks
    demo_model.py heldout  RUN MODEL OUTDIR         a slice of the demo held-out set (seed 2,
                                                    never trained on): closed accuracy >= 0.85
Each exits 0 on success, 1 with a message on failure.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.path.join(ROOT, "tools")
REF = os.path.join(ROOT, "tests", "reference")
sys.path[:0] = [TOOLS, REF]
PY = sys.executable
ENV = dict(os.environ, MEDMOE_THREADS=os.environ.get("MEDMOE_THREADS", "1"))


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def read_cases(cases):
    with open(os.path.join(cases, "cases.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def expert_names(model):
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)["moe"]["expert_names"]


def run_engine(run, model, image, question, extra=()):
    cmd = [run, "--model", model, "--vision", os.path.join(model, "clip"), "--image", image,
           "--question", question, "--max-tokens", "8", "--json"] + list(extra)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                       universal_newlines=True)
    if p.returncode:
        fail("%s exited %d: %s" % (" ".join(cmd), p.returncode, p.stderr[-400:]))
    return json.loads(p.stdout[p.stdout.find("{"):])


def t_cases(run, model, cases):
    names = expert_names(model)
    bad = 0
    for c in read_cases(cases):
        r = run_engine(run, model, os.path.join(cases, c["image"]), c["question"])
        ok = c["answer"].lower() in r["answer"].lower()
        e = names.index(c["modality"])
        shares = ["%d/%d" % (s["image_tokens_per_expert"][e], sum(s["image_tokens_per_expert"]))
                  for s in r["expert_summary"]]
        routed = all(2 * s["image_tokens_per_expert"][e] > sum(s["image_tokens_per_expert"])
                     for s in r["expert_summary"])
        print("%-16s %-45s gt %-9s answer %-12r %s; image tokens to expert '%s': %s"
              % (c["image"], c["question"], c["answer"], r["answer"], "ok" if ok else "WRONG",
                 c["modality"], " ".join(shares)))
        bad += (not ok) + (not routed)
    if bad:
        fail("%d sample-case check(s) failed (wrong answer, or image tokens not mostly routed "
             "to their modality's expert)" % bad)
    print("OK: all sample cases answered correctly and routed to their modality's expert")


def t_oracle(run, model, cases, out):
    os.makedirs(out, exist_ok=True)
    c = read_cases(cases)[2]
    img = os.path.join(cases, c["image"])
    ref = os.path.join(out, "ref.json")
    p = subprocess.run([PY, os.path.join(REF, "medmoe_ref.py"), "--model", model, "--vision",
                        os.path.join(model, "clip"), "--image", img, "--question", c["question"],
                        "--max-tokens", "8", "--json", ref, "--dump-logits", ref + ".f32"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    print(p.stdout.strip())
    if p.returncode:
        fail("medmoe_ref.py exited %d" % p.returncode)
    r = run_engine(run, model, img, c["question"], ["--dump-logits", os.path.join(out, "run.f32")])
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(r, f)
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    p = subprocess.run([PY, os.path.join(REF, "compare.py"), ref, os.path.join(out, "run.json"),
                        "--logits", ref + ".f32", os.path.join(out, "run.f32"), "--vocab", str(vocab)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    print(p.stdout.strip())
    if p.returncode:
        fail("oracle and medmoe-run differ")


def t_trainfwd(model, cases):
    import torch
    import image_ref
    import train_demo
    from bpe_ref import BPETokenizer
    import medmoe_ref as R
    m = train_demo.load(model)
    tok = BPETokenizer.from_dir(model)
    ref, clip = R.MedMoE(model), R.Clip(os.path.join(model, "clip"))
    worst = 0.0
    for c in read_cases(cases)[:4]:
        px = image_ref.preprocess(os.path.join(cases, c["image"]), clip.size)
        a = train_demo.prompt_logits(m, tok, torch.from_numpy(px), c["question"])
        emb, _, _ = R.build_prompt(tok, ref, R.image_features(clip, ref, px), c["question"], "train")
        b = ref.forward(emb)[0][-1][: len(tok)]
        worst = max(worst, float((a - b).abs().max()))
    print("max |logit diff| training forward vs oracle: %.3g" % worst)
    if worst > 1e-3:
        fail("tools/train_demo.py's forward is not the served math")


def eval_cmd(run, model, data, out, *extra):
    cmd = [PY, os.path.join(TOOLS, "eval_vqa.py"), "--run", run, "--model", model, "--data", data,
           "--json-out", out] + list(extra)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                       env=ENV)
    print(p.stdout.strip())
    return p.returncode, (json.load(open(out)) if os.path.exists(out) and p.returncode in (0, 1) else None)


def t_formats(run, model, cases, out):
    import eval_vqa as ev
    os.makedirs(out, exist_ok=True)
    # Metric unit checks (closed: substring; open: normalised unigram recall etc.).
    s = ev.score("Yes, there is.", "yes", "CLOSED")
    assert s["hit"] == 1.0 and s["correct"] == 1.0, s
    assert ev.score("no", "yes", "CLOSED")["hit"] == 0.0
    s = ev.score("the left lung", "left lung", "OPEN")
    assert s["recall"] == 1.0 and abs(s["precision"] - 2 / 3) < 1e-9 and s["exact"] == 0.0, s
    assert ev.score("Two lesions.", "2 lesions", "OPEN")["exact"] == 1.0
    assert ev.normalize("An X-ray, (PA).") == "an x-ray pa", ev.normalize("An X-ray, (PA).")
    assert ev.score("", "yes", "CLOSED")["hit"] == 0.0 and ev.score("x", "", "OPEN")["recall"] == 0.0

    cs = read_cases(cases)
    img = [c["image"] for c in cs]
    # VQA-RAD: list, image_name, answer_type CLOSED/OPEN (with the real set's stray space),
    # a numeric answer.
    rad = [{"qid": 1, "image_name": img[0], "question": cs[0]["question"], "answer": cs[0]["answer"],
            "answer_type": "OPEN", "question_type": "MODALITY", "image_organ": "ABD"},
           {"qid": 2, "image_name": img[4], "question": cs[4]["question"], "answer": cs[4]["answer"],
            "answer_type": "CLOSED ", "question_type": "MODALITY", "image_organ": "ABD"},
           {"qid": 3, "image_name": img[7], "question": cs[7]["question"], "answer": int(cs[7]["answer"]),
            "answer_type": "OPEN", "question_type": "COUNT", "image_organ": "CHEST"}]
    # SLAKE: img_name, q_lang (the zh item must be dropped), modality, content_type.
    slake = [{"qid": 10, "img_name": img[1], "question": cs[1]["question"], "answer": cs[1]["answer"],
              "answer_type": "CLOSED", "q_lang": "en", "modality": "MRI", "content_type": "Abnormality"},
             {"qid": 11, "img_name": img[1], "question": "这是什么模态？", "answer": "MRI",
              "answer_type": "OPEN", "q_lang": "zh", "modality": "MRI", "content_type": "Modality"},
             {"qid": 12, "img_name": img[6], "question": cs[6]["question"], "answer": "X-Ray",
              "answer_type": "OPEN", "q_lang": "en", "modality": "X-Ray", "content_type": "Modality"}]
    # PathVQA as LLaVA-Med / Med-MoE use it: conversations, answer_type sometimes absent.
    path = [{"id": "p1", "image": img[3], "conversations": [
                {"from": "human", "value": "<image>\n" + cs[3]["question"]},
                {"from": "gpt", "value": cs[3]["answer"]}], "answer_type": "OPEN"},
            {"id": "p2", "image": img[7], "conversations": [
                {"from": "human", "value": "<image>\nIs there a lesion?"},
                {"from": "gpt", "value": "yes"}]}]
    specs = [("vqa_rad.json", rad, 3, {"CLOSED": 1, "OPEN": 2}),
             ("slake.json", slake, 2, {"CLOSED": 1, "OPEN": 1}),
             ("pathvqa.json", path, 2, {"CLOSED": 1, "OPEN": 1})]
    for name, rows, n, types in specs:
        data = os.path.join(out, name)
        with open(data, "w") as f:
            json.dump(rows, f, ensure_ascii=False)
        items = ev.load_items(data, "auto", cases)
        got = {t: sum(i["answer_type"] == t for i in items) for t in ("CLOSED", "OPEN")}
        if len(items) != n or got != types:
            fail("%s: parsed %d items %s, want %d %s" % (name, len(items), got, n, types))
        rc, rep = eval_cmd(run, model, data, os.path.join(out, name + ".report.json"), "--images", cases)
        if rc or rep is None:
            fail("eval_vqa.py on %s exited %d" % (name, rc))
        r = rep["report"]
        if r["n"] != n or any(i["prediction"] == "" for i in rep["items"]):
            fail("%s: report has %d items (want %d) or empty predictions" % (name, r["n"], n))
        if name == "slake.json" and "mri" not in r["routing"]["image_token_purity"]:
            fail("slake: routing purity missing for modality MRI")
    # JSON lines (the demo's own format), via the sample cases.
    data = os.path.join(out, "cases.jsonl")
    with open(data, "w") as f:
        for c in cs:
            f.write(json.dumps(dict(c, image=os.path.join(os.path.abspath(cases), c["image"]))) + "\n")
    rc, rep = eval_cmd(run, model, data, os.path.join(out, "cases.report.json"), "--min-closed-acc", "1.0")
    if rc:
        fail("eval_vqa.py on the sample cases exited %d" % rc)
    print("OK: VQA-RAD, SLAKE, PathVQA and JSON-lines inputs parsed and evaluated")


def t_heldout(run, model, out):
    import demo_data
    os.makedirs(out, exist_ok=True)
    demo_data.write_split(out, 8, demo_data.SEEDS["heldout"], "he")
    rc, rep = eval_cmd(run, model, os.path.join(out, "vqa.jsonl"), os.path.join(out, "report.json"),
                       "--min-closed-acc", "0.85")
    if rc:
        fail("held-out slice: eval_vqa.py exited %d" % rc)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    {"cases": t_cases, "oracle": t_oracle, "trainfwd": t_trainfwd, "formats": t_formats,
     "heldout": t_heldout}[cmd](*args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
