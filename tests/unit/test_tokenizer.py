#!/usr/bin/python3
"""test_tokenizer.py — drive the C tokenizer (tests/test_tokenizer.c) and
compare it with the Python reference (tests/reference/bpe_ref.py).

  test_tokenizer.py setup DIR             make the test tokenizers into DIR
  test_tokenizer.py check DIR C_PROGRAM   compare; exit 0 when all agree

DIR/gpt2      tokenizer.json (ByteLevel pre-tokenizer) + config files
DIR/cl100k    tokenizer.json (Split cl100k + ByteLevel) + arcade100k.tiktoken
DIR/tiktoken  arcade100k.tiktoken alone (the loader's fallback)
DIR/lengths.json  what make_tokenizer.py reported
"""

import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))

import bpe_ref  # noqa: E402
import make_tokenizer  # noqa: E402

CORPUS = os.path.join(HERE, "..", "data", "tokenizer_corpus.txt")
FAILS = []


def fail(msg):
    FAILS.append(msg)
    print("FAIL: " + msg)


def setup(d):
    if os.path.isdir(d):
        shutil.rmtree(d)
    lengths = {
        "gpt2": make_tokenizer.write_tokenizer(os.path.join(d, "gpt2"), "gpt2"),
        "cl100k": make_tokenizer.write_tokenizer(os.path.join(d, "cl100k"), "cl100k",
                                                 tiktoken=True),
    }
    os.makedirs(os.path.join(d, "tiktoken"))
    shutil.copy(os.path.join(d, "cl100k", "arcade100k.tiktoken"), os.path.join(d, "tiktoken"))
    with open(os.path.join(d, "lengths.json"), "w") as fh:
        json.dump(lengths, fh)
    print("tokenizers written to %s: %s" % (d, lengths))
    return 0


def corpus_texts():
    """Each line (without its newline), then the whole file — as the C program does."""
    with open(CORPUS, "rb") as fh:
        raw = fh.read()
    return raw.decode("utf-8").split("\n") + [raw.decode("utf-8")]


def run_c(prog, *args):
    r = subprocess.run([prog] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=120)
    if r.stderr:
        sys.stdout.write(r.stderr.decode("utf-8", "replace"))
    return r.returncode, r.stdout.decode("utf-8")


def c_encode(prog, path, label, roundtrip=True):
    rc, out = run_c(prog, "encode", path, CORPUS, *([] if roundtrip else ["--no-roundtrip"]))
    if rc != 0:
        fail("%s: C encode/decode self-check failed (exit %d)" % (label, rc))
    return [json.loads(line) for line in out.splitlines()]


def compare(label, texts, got, want):
    if len(got) != len(want):
        fail("%s: %d id lists, expected %d" % (label, len(got), len(want)))
        return
    bad = 0
    for t, g, w in zip(texts, got, want):
        if g != w:
            bad += 1
            if bad <= 3:
                fail("%s: %r\n   got  %s\n   want %s" % (label, t[:80], g[:40], w[:40]))
    if bad:
        fail("%s: %d of %d texts differ" % (label, bad, len(texts)))
    else:
        print("ok   %s: %d texts, %d ids" % (label, len(texts), sum(map(len, got))))


def check_encoding(d, prog, texts):
    cases = [
        ("gpt2 tokenizer.json", os.path.join(d, "gpt2"), bpe_ref.BPETokenizer.from_dir),
        ("cl100k tokenizer.json", os.path.join(d, "cl100k", "tokenizer.json"),
         bpe_ref.BPETokenizer.from_tokenizer_json),
        ("cl100k arcade100k.tiktoken", os.path.join(d, "cl100k", "arcade100k.tiktoken"),
         bpe_ref.BPETokenizer.from_tiktoken),
        ("tiktoken-only dir", os.path.join(d, "tiktoken"), bpe_ref.BPETokenizer.from_dir),
    ]
    results = {}
    for label, path, load in cases:
        ref = load(path)
        want = [ref.encode(t) for t in texts]
        for t, ids in zip(texts, want):
            if ref.decode(ids) != t:
                fail("%s: Python decode(encode(x)) != x for %r" % (label, t[:60]))
        got = c_encode(prog, path, label)
        compare("C vs Python, " + label, texts, got, want)
        results[label] = (got, ref)
    # the tiktoken file and the tokenizer.json of the same flavor agree
    compare("tiktoken vs tokenizer.json (C)", texts, results["cl100k arcade100k.tiktoken"][0],
            results["cl100k tokenizer.json"][0])
    # the special token is one id, found inside text
    for label, (got, ref) in results.items():
        eot = ref.token_id("<|endoftext|>")
        line = [i for i, t in enumerate(texts) if t.startswith("Special tokens inline")][0]
        if got[line].count(eot) != 3:
            fail("%s: expected 3 x <|endoftext|> (%d) in %s" % (label, eot, got[line]))
    return results


def check_lengths(d, prog, results):
    with open(os.path.join(d, "lengths.json")) as fh:
        lengths = json.load(fh)
    for label, flavor, path in [("gpt2", "gpt2", "gpt2"), ("cl100k", "cl100k", "cl100k"),
                                ("tiktoken", "cl100k", "tiktoken")]:
        rc, out = run_c(prog, "load", os.path.join(d, path))
        ref = bpe_ref.BPETokenizer.from_dir(os.path.join(d, path))
        want = "OK %d %d" % (lengths[flavor], ref.eos_id)
        if out.strip() != want or len(ref) != lengths[flavor]:
            fail("%s: C load says %r, Python len %d, expected %r" % (label, out.strip(), len(ref),
                                                                     want))
        else:
            print("ok   %s: length %d, eos %d" % (label, lengths[flavor], ref.eos_id))


def check_prompts(d, prog):
    questions = corpus_texts()[:-1]
    for flavor in ("gpt2", "cl100k"):
        ref = bpe_ref.BPETokenizer.from_dir(os.path.join(d, flavor))
        rc, out = run_c(prog, "prompt", os.path.join(d, flavor), CORPUS)
        if rc != 0:
            fail("%s: C prompt program failed (exit %d)" % (flavor, rc))
        got = [json.loads(line) for line in out.splitlines()]
        want = []
        for q in questions:
            for mode in bpe_ref.CONV_MODES:
                for image in (1, 0):
                    b, a = bpe_ref.prompt_ids(ref, q, mode, bool(image))
                    want.append({"mode": mode, "image": image, "before": b, "after": a})
        if got != want:
            bad = [(g, w) for g, w in zip(got, want) if g != w]
            fail("%s prompts: %d of %d differ (lengths %d/%d); first: %s" % (
                flavor, len(bad), len(want), len(got), len(want), bad[:1]))
        else:
            print("ok   %s prompts: %d" % (flavor, len(want)))
    # the exact text of the training template, independent of any tokenizer
    t = bpe_ref.render_prompt("<image>\nIs it? ", "phi")
    if not t.endswith("questions. USER: <image>\nIs it? ASSISTANT:"):
        fail("phi template text: %r" % t)


def check_bad_files(d, prog):
    bad = os.path.join(d, "bad")
    if os.path.isdir(bad):
        shutil.rmtree(bad)
    os.makedirs(bad)
    with open(os.path.join(d, "gpt2", "tokenizer.json"), encoding="utf-8") as fh:
        good = json.load(fh)
    vocab = good["model"]["vocab"]
    first_merge = good["model"]["merges"][0]
    a0 = first_merge.split(" ")[0]

    def variant(name, mutate, expect, status="EPROTO"):
        doc = json.loads(json.dumps(good))
        text = mutate(doc)
        path = os.path.join(bad, name + ".json")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text if isinstance(text, str) else json.dumps(doc, ensure_ascii=False))
        rc, out = run_c(prog, "load", path)
        out = out.strip()
        ok = (rc == 0 and out.startswith("ERR %s " % status) and path in out and
              all(e in out for e in expect))
        if not ok:
            fail("bad file %s: got %r (exit %d), want ERR %s with %s" % (name, out, rc, status,
                                                                        expect))
        else:
            print("ok   bad file %s: %s" % (name, out.split(": ", 1)[-1]))

    def set_(path, value):
        def f(doc):
            node = doc
            for k in path[:-1]:
                node = node[k]
            if value is KeyError:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        return f

    variant("no_model", set_(["model"], KeyError), ['"model"'])
    variant("not_json", lambda doc: '{"model": {', ["not valid JSON"])
    variant("merge_unknown",
            set_(["model", "merges", 5], "Ġqqq zzz"), ["model.merges[5]", "not in model.vocab"])
    variant("merge_malformed", set_(["model", "merges", 2], "abc"), ["model.merges[2]"])
    variant("id_negative", set_(["model", "vocab", a0], -1), ["model.vocab", "out of range"])
    variant("id_huge", set_(["model", "vocab", a0], 1 << 30), ["model.vocab", "out of range"])
    variant("id_duplicate", set_(["model", "vocab", a0], vocab["!"]), ["model.vocab",
                                                                       "used twice"])
    variant("id_string", set_(["model", "vocab", a0], "7"), ["model.vocab", "not an integer"])
    variant("vocab_missing", set_(["model", "vocab"], KeyError), ["model.vocab"])
    variant("not_byte_level", set_(["model", "vocab", "中"], 99999), ["model.vocab",
                                                                     "byte-level"])
    variant("added_collides", set_(["added_tokens", 0, "id"], vocab["!"]),
            ["added_tokens[0]", "already belongs"])
    variant("normalizer", set_(["normalizer"], {"type": "NFC"}), ["normalizer"], "EUNSUPPORTED")
    variant("wordpiece", set_(["model", "type"], "WordPiece"), ["model.type"], "EUNSUPPORTED")
    variant("no_pre_tokenizer", set_(["pre_tokenizer"], None), ["pre_tokenizer"], "EUNSUPPORTED")
    variant("bad_regex", set_(["pre_tokenizer"], {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}), ["pre_tokenizer[0]", "regex"])

    def drop_byte(doc):  # remove the byte 0x00 token ("Ā"), used by no merge here
        del doc["model"]["vocab"]["Ā"]
        doc["model"]["merges"] = [m for m in doc["model"]["merges"] if "Ā" not in m]
    variant("missing_byte", drop_byte, ["byte 0x00"])

    # the newer [a, b] merge form reads the same
    doc = json.loads(json.dumps(good))
    doc["model"]["merges"] = [m.split(" ") for m in doc["model"]["merges"]]
    pair_dir = os.path.join(bad, "pairs")
    os.makedirs(pair_dir)
    with open(os.path.join(pair_dir, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, ensure_ascii=False)
    got = c_encode(prog, pair_dir, "pair merges")
    want = c_encode(prog, os.path.join(d, "gpt2"), "string merges")
    ref = bpe_ref.BPETokenizer.from_dir(pair_dir)
    if got != want or [ref.encode(t) for t in corpus_texts()] != want:
        fail("[a, b] merges give other ids than \"a b\" merges")
    else:
        print("ok   [a, b] merge form")

    # options real tokenizers use: C and Python must still agree
    def agree(name, mutate, roundtrip=True):
        doc = json.loads(json.dumps(good))
        mutate(doc)
        vdir = os.path.join(bad, name)
        os.makedirs(vdir)
        with open(os.path.join(vdir, "tokenizer.json"), "w", encoding="utf-8") as fh:
            json.dump(doc, fh, ensure_ascii=False)
        texts = corpus_texts()
        ref = bpe_ref.BPETokenizer.from_dir(vdir)
        compare("C vs Python, " + name, texts, c_encode(prog, vdir, name, roundtrip),
                [ref.encode(t) for t in texts])

    agree("add_prefix_space", set_(["pre_tokenizer", "add_prefix_space"], True), False)
    agree("ignore_merges", set_(["model", "ignore_merges"], True))
    agree("split_then_bytelevel_regex", set_(["pre_tokenizer"], {
        "type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": make_tokenizer.CL100K_PATTERN},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}]}), False)

    def more_added(doc):  # a non-special added token that overlaps <|endoftext|>
        doc["added_tokens"].append({"id": len(vocab) + 2, "content": "<|endoftext|>text",
                                    "special": False})
        doc["added_tokens"].append({"id": len(vocab) + 3, "content": "  ", "special": False})
    agree("more_added_tokens", more_added)

    # tiktoken files
    with open(os.path.join(d, "cl100k", "arcade100k.tiktoken")) as fh:
        lines = fh.read().splitlines()

    def tk(name, body, expect):
        path = os.path.join(bad, name + ".tiktoken")
        with open(path, "w") as fh:
            fh.write("\n".join(body) + "\n")
        rc, out = run_c(prog, "load", path)
        out = out.strip()
        if rc != 0 or not out.startswith("ERR EPROTO ") or not all(e in out for e in expect):
            fail("bad tiktoken %s: got %r, want %s" % (name, out, expect))
        else:
            print("ok   bad tiktoken %s: %s" % (name, out.split(": ", 1)[-1]))

    tk("base64", lines[:2] + ["@@@@ 2"] + lines[3:], [":3:", "base64"])
    tk("rank", lines[:4] + ["IQ== x"] + lines[5:], [":5:", "rank"])
    tk("dup_rank", lines[:6] + [lines[6].split()[0] + " 1"] + lines[7:], [":7:", "used twice"])
    tk("dup_token", lines + [lines[0].split()[0] + " %d" % len(lines)], ["appears twice"])
    tk("no_space", lines[:1] + ["IQ=="] + lines[2:], [":2:"])
    tk("missing_byte", lines[1:], ["byte 0x21"])
    empty = os.path.join(bad, "empty_dir")
    os.makedirs(empty)
    rc, out = run_c(prog, "load", empty)
    if not out.startswith("ERR ENOTFOUND") or "tiktoken" not in out:
        fail("empty dir: %r" % out)


def check(d, prog):
    texts = corpus_texts()
    results = check_encoding(d, prog, texts)
    check_lengths(d, prog, results)
    check_prompts(d, prog)
    check_bad_files(d, prog)
    print("%d passed, %d failed" % (1 if not FAILS else 0, 1 if FAILS else 0))
    return 1 if FAILS else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "setup":
        sys.exit(setup(sys.argv[2]))
    if len(sys.argv) == 4 and sys.argv[1] == "check":
        sys.exit(check(sys.argv[2], sys.argv[3]))
    print(__doc__)
    sys.exit(2)
