#!/usr/bin/python3
"""demo_data.py — the synthetic "medical-like" VQA data set the demo model is trained on.

Four imaging "modalities" with distinct visual statistics, 64x64 RGB images:
  ct         wide round body cross-section, flat grey soft tissue, bright bone ring,
             darker organ ellipses, black background; lesions: bright round blobs
  mri        tall oval head-like slice: bright outer rim, dark skull ring, smooth textured
             brain, dark ventricles; lesions: bright blurred blobs
  x-ray      projection: bright body, two dark lung fields with bright rib arcs, spine
             and mediastinum; lesions: bright opacities
  pathology  pink H&E-like field with many small purple nuclei; lesions: large dark
             purple blobs
Each image has k = 0..3 lesions, each at one of four slots (left, right, upper, lower,
with jitter), so the answers depend on the image.

Question types (several phrasings each; answers are lower-case, as in VQA-RAD):
  modality     OPEN    "What modality is this image?"          -> ct | mri | x-ray | pathology
  modality_yn  CLOSED  "Is this an MRI?"                        -> yes | no
  presence     CLOSED  "Is there a lesion?"                     -> yes | no
  count        OPEN    "How many lesions are there?"            -> 0 | 1 | 2 | 3
  position     OPEN    "Where is the lesion?" (k == 1 only)     -> left | right | upper | lower
  position_yn  CLOSED  "Is the lesion on the left?" (k == 1)    -> yes | no

Deterministic: the same seed gives the same images and questions (numpy RandomState).
Train and held-out sets use different seeds (see SEEDS), so no image is shared.

CLI:
  demo_data.py --out DIR --split heldout|train [--images N] [--seed S]
writes DIR/images/<id>.png and DIR/vqa.jsonl, one line per question:
  {"id", "image", "question", "answer", "qtype", "answer_type", "modality"}
(the JSON-lines format tools/eval_vqa.py reads).
  demo_data.py --out demo/cases --split cases --images 8
writes the sample cases of `make demo` (write_cases below).
Python: samples(n, seed) -> [Sample]; caption(sample); write_cases(dir).
"""

import argparse
import json
import os
import sys

import numpy as np

SIZE = 64
MODALITIES = ["ct", "mri", "x-ray", "pathology"]  # = the expert order of the demo model
# Lesion slots (x, y) in the 64x64 image: the centres of patches of the demo tower's
# 5x5 grid (40 px input, patch 8 -> 12.8 px of this image per patch), so that a lesion
# lies in one patch rather than straddling four.
SLOTS = {"left": (19.2, 32), "right": (44.8, 32), "upper": (32, 19.2), "lower": (32, 44.8)}
SLOT_NAMES = ["left", "right", "upper", "lower"]
SEEDS = {"train": 1, "heldout": 2, "cases": 3}
K_PROBS = [0.35, 0.35, 0.15, 0.15]

MOD_NAMES = {"ct": ["CT", "CT scan", "computed tomography image"],
             "mri": ["MRI", "MRI scan", "MR image"],
             "x-ray": ["X-ray", "radiograph", "X-ray image"],
             "pathology": ["pathology slide", "histology image", "pathology image"]}
ARTICLE = {"CT": "a", "CT scan": "a", "computed tomography image": "a", "MRI": "an",
           "MRI scan": "an", "MR image": "an", "X-ray": "an", "radiograph": "a",
           "X-ray image": "an", "pathology slide": "a", "histology image": "a",
           "pathology image": "a"}
Q = {
    "modality": ["What modality is this image?", "What imaging modality was used?",
                 "Which modality is shown?", "What kind of image is this?",
                 "How was this image acquired?", "What modality is used to take this image?"],
    "modality_yn": ["Is this {a} {m}?", "Is this image {a} {m}?", "Was this taken as {a} {m}?",
                    "Does this look like {a} {m}?"],
    "presence": ["Is there a lesion?", "Is there a lesion in this image?", "Are there any lesions?",
                 "Is any abnormality visible?", "Does this image show a lesion?",
                 "Is the image normal?"],
    "count": ["How many lesions are there?", "How many lesions are seen?",
              "What is the number of lesions?", "Count the lesions.",
              "How many abnormalities are visible?"],
    "position": ["Where is the lesion?", "Where is the lesion located?",
                 "In which part of the image is the lesion?", "Where is the abnormality?",
                 "Which region contains the lesion?"],
    "position_yn": ["Is the lesion on the {s}?", "Is the lesion in the {s} part?",
                    "Is the abnormality on the {s} side?", "Is there a lesion on the {s}?"],
}
SIDE_WORD = {"left": "left", "right": "right", "upper": "upper", "lower": "lower"}
QTYPES = ["modality", "modality_yn", "presence", "count", "position", "position_yn"]
ANSWER_TYPE = {"modality": "OPEN", "modality_yn": "CLOSED", "presence": "CLOSED",
               "count": "OPEN", "position": "OPEN", "position_yn": "CLOSED"}


# ------------------------------------------------------------------ drawing
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)


def _ellipse(cx, cy, a, b):
    """Normalised radius: < 1 inside the ellipse."""
    return np.sqrt(((_XX - cx) / a) ** 2 + ((_YY - cy) / b) ** 2)


def _disc(cx, cy, r, soft=1.0):
    """Soft disc mask in [0, 1]."""
    d = np.sqrt((_XX - cx) ** 2 + (_YY - cy) ** 2)
    return np.clip((r - d) / soft + 0.5, 0.0, 1.0)


def _smooth_noise(rng, scale):
    """Low-frequency noise: a coarse grid upsampled bilinearly."""
    n = SIZE // scale + 2
    g = rng.standard_normal((n, n))
    t = _XX / scale
    u = _YY / scale
    i, j = t.astype(int), u.astype(int)
    ft, fu = t - i, u - j
    return (g[j, i] * (1 - ft) * (1 - fu) + g[j, i + 1] * ft * (1 - fu) +
            g[j + 1, i] * (1 - ft) * fu + g[j + 1, i + 1] * ft * fu)


def _lesion_centres(rng, slots):
    return [(SLOTS[s][0] + rng.uniform(-1.5, 1.5), SLOTS[s][1] + rng.uniform(-1.5, 1.5)) for s in slots]


def draw_ct(rng, slots):
    img = rng.uniform(0, 8) + rng.normal(0, 2, (SIZE, SIZE))
    a, b = rng.uniform(27, 29.5), rng.uniform(23, 25)
    cx, cy = 32 + rng.uniform(-1, 1), 33 + rng.uniform(-1, 1)
    body = _ellipse(cx, cy, a, b)
    tissue = rng.uniform(90, 110)
    img = np.where(body < 1, tissue + rng.normal(0, 5, (SIZE, SIZE)), img)
    img = np.where((body < 1) & (body > 0.94), tissue - 30, img)  # fat rim
    ring = (body > 0.80) & (body < 0.87)
    img = np.where(ring, rng.uniform(215, 240) + rng.normal(0, 6, (SIZE, SIZE)), img)  # bone
    for _ in range(2):  # organs: darker ellipses
        ox, oy = cx + rng.uniform(-8, 8), cy + rng.uniform(-6, 6)
        org = _ellipse(ox, oy, rng.uniform(4, 7), rng.uniform(3, 6)) < 1
        img = np.where(org & (body < 0.75), tissue - rng.uniform(15, 25), img)
    for x, y in _lesion_centres(rng, slots):
        m = _disc(x, y, rng.uniform(4, 5))
        img = img * (1 - m) + m * (rng.uniform(185, 210) + rng.normal(0, 4, (SIZE, SIZE)))
    g = np.clip(img, 0, 255)
    return np.stack([g, g, g], -1)


def draw_mri(rng, slots):
    img = rng.normal(4, 2, (SIZE, SIZE))
    a, b = rng.uniform(24, 26), rng.uniform(28, 30)
    cx, cy = 32 + rng.uniform(-1, 1), 32 + rng.uniform(-1, 1)
    head = _ellipse(cx, cy, a, b)
    brain = 120 + 28 * _smooth_noise(rng, 8) + 10 * _smooth_noise(rng, 4)
    img = np.where(head < 1, brain, img)
    img = np.where((head < 1) & (head > 0.92), rng.uniform(190, 215), img)   # scalp fat
    img = np.where((head <= 0.92) & (head > 0.84), rng.uniform(20, 40), img)  # skull
    for sx in (-1, 1):  # ventricles: dark, butterfly-shaped
        v = _ellipse(cx + sx * 3.5, cy + rng.uniform(-1, 1), 2.2, 6) < 1
        img = np.where(v, rng.uniform(30, 50), img)
    for x, y in _lesion_centres(rng, slots):
        r = rng.uniform(4, 5)
        m = np.exp(-((_XX - x) ** 2 + (_YY - y) ** 2) / (2 * (r * 0.75) ** 2))
        m = np.clip(m * 1.6, 0, 1)
        img = img * (1 - m) + m * rng.uniform(225, 245)
    g = np.clip(img, 0, 255)
    return np.stack([g, g, g], -1)


def draw_xray(rng, slots):
    body = rng.uniform(140, 160)
    img = np.full((SIZE, SIZE), body) + 8 * _smooth_noise(rng, 16)
    edge = np.abs(_XX - 32) > rng.uniform(28, 30)
    img = np.where(edge, rng.uniform(15, 30), img)
    lung_v = rng.uniform(45, 65)
    lungs = np.zeros((SIZE, SIZE), bool)
    for lx in (19, 45):
        lungs |= _ellipse(lx + rng.uniform(-1, 1), 31 + rng.uniform(-1, 1), 11, 21) < 1
    img = np.where(lungs, lung_v + 6 * _smooth_noise(rng, 8), img)
    phase = rng.uniform(0, 7)
    ribs = (np.mod(_YY + 3 * np.cos((_XX - 32) / 10.0) + phase, 7.0) < 1.6) & lungs
    img = np.where(ribs, img + rng.uniform(35, 50), img)
    spine = np.abs(_XX - 32) < 2.5
    img = np.where(spine, rng.uniform(165, 180), img)
    for x, y in _lesion_centres(rng, slots):
        m = _disc(x, y, rng.uniform(4, 5), soft=1.5)
        img = img * (1 - m) + m * rng.uniform(230, 250)
    img = img + rng.normal(0, 3, (SIZE, SIZE))
    g = np.clip(img, 0, 255)
    tint = np.array([1.0, 1.0, rng.uniform(0.96, 1.0)])
    return g[..., None] * tint


def draw_pathology(rng, slots):
    bg = np.array([rng.uniform(228, 245), rng.uniform(180, 200), rng.uniform(205, 225)])
    tex = 10 * _smooth_noise(rng, 4)
    img = bg[None, None, :] + tex[..., None] * np.array([0.4, 1.0, 0.6])
    nucleus = np.array([rng.uniform(100, 130), rng.uniform(50, 75), rng.uniform(140, 170)])
    for _ in range(rng.randint(45, 75)):
        x, y = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
        m = _disc(x, y, rng.uniform(1.2, 2.2), soft=0.8)[..., None]
        img = img * (1 - m) + m * (nucleus + rng.normal(0, 8, 3))
    dark = np.array([rng.uniform(50, 70), rng.uniform(15, 30), rng.uniform(80, 100)])
    for x, y in _lesion_centres(rng, slots):
        m = _disc(x, y, rng.uniform(4.5, 5.5), soft=1.2)[..., None]
        img = img * (1 - m) + m * (dark + rng.normal(0, 5, (SIZE, SIZE, 3)))
    img = img + rng.normal(0, 3, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255)


DRAW = {"ct": draw_ct, "mri": draw_mri, "x-ray": draw_xray, "pathology": draw_pathology}


# ------------------------------------------------------------------ samples
class Sample:
    """One image and its questions."""

    def __init__(self, sid, modality, slots, image, qas):
        self.id, self.modality, self.slots, self.image, self.qas = sid, modality, slots, image, qas


def questions(rng, modality, slots):
    """All question types that apply to an image, one random phrasing each."""
    k = len(slots)
    out = []

    def add(qtype, q, a):
        out.append({"question": q, "answer": a, "qtype": qtype, "answer_type": ANSWER_TYPE[qtype]})

    pick = lambda xs: xs[rng.randint(len(xs))]  # noqa: E731
    add("modality", pick(Q["modality"]), modality)
    asked = modality if rng.rand() < 0.5 else pick([m for m in MODALITIES if m != modality])
    name = pick(MOD_NAMES[asked])
    add("modality_yn", pick(Q["modality_yn"]).format(a=ARTICLE[name], m=name),
        "yes" if asked == modality else "no")
    q = pick(Q["presence"])
    if q == "Is the image normal?":
        add("presence", q, "no" if k else "yes")
    else:
        add("presence", q, "yes" if k else "no")
    add("count", pick(Q["count"]), str(k))
    if k == 1:
        add("position", pick(Q["position"]), slots[0])
        side = slots[0] if rng.rand() < 0.5 else pick([s for s in SLOT_NAMES if s != slots[0]])
        add("position_yn", pick(Q["position_yn"]).format(s=SIDE_WORD[side]),
            "yes" if side == slots[0] else "no")
    return out


SLOT_Q = ["Is there a lesion on the {s}?", "Is there a lesion in the {s} part?",
          "Is there an abnormality on the {s} side?"]


def slot_questions(rng, slots):
    """Training-only extra questions (train_demo.py adds them; the held-out set never has
    them): for each of the four slots, is a lesion there? Phrasings that do not presuppose
    a single lesion, so they apply to any image; for one lesion they agree with position_yn."""
    return [{"question": SLOT_Q[rng.randint(len(SLOT_Q))].format(s=SIDE_WORD[s]),
             "answer": "yes" if s in slots else "no", "qtype": "slot_yn", "answer_type": "CLOSED"}
            for s in SLOT_NAMES]


def samples(n, seed, prefix="img", draws=1):
    """n images, modalities in turn (balanced), with their questions (draws > 1: that
    many random draws of phrasings / asked modality / asked side, duplicates dropped —
    the training set uses 3)."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        modality = MODALITIES[i % 4]
        k = int(rng.choice(4, p=K_PROBS))
        slots = [SLOT_NAMES[j] for j in sorted(rng.permutation(4)[:k])]
        img = DRAW[modality](rng, slots)
        image = np.clip(np.round(img), 0, 255).astype(np.uint8)
        qas = questions(rng, modality, slots)
        for _ in range(draws - 1):
            qas += [q for q in questions(rng, modality, slots) if q not in qas]
        out.append(Sample("%s%05d" % (prefix, i), modality, slots, image, qas))
    return out


def caption(s):
    """Stage-1 (alignment) caption of a sample."""
    name = {"ct": "a CT", "mri": "an MRI", "x-ray": "an X-ray", "pathology": "a pathology"}[s.modality]
    k = len(s.slots)
    if k == 0:
        return "This is %s image with no lesion." % name
    if k == 1:
        return "This is %s image with one lesion on the %s." % (name, s.slots[0])
    return "This is %s image with %d lesions." % (name, k)


def write_png(path, arr):
    from PIL import Image
    Image.fromarray(arr, "RGB").save(path, optimize=False)


def write_split(out_dir, n, seed, prefix):
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    for s in samples(n, seed, prefix):
        name = "images/%s.png" % s.id
        write_png(os.path.join(out_dir, name), s.image)
        for j, qa in enumerate(s.qas):
            rows.append(dict(id="%s_%d" % (s.id, j), image=name, modality=s.modality, **qa))
    with open(os.path.join(out_dir, "vqa.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


CASE_QTYPES = ["modality", "presence", "position", "count", "modality_yn", "position_yn",
               "modality", "count"]


def write_cases(out_dir, n=8, seed=SEEDS["cases"]):
    """demo/cases: n images (modalities in turn) named <modality>_<k>.png, one question
    each (question types in CASE_QTYPES order, falling back to count when the image has
    no single lesion), in cases.jsonl: {"image", "question", "answer", "modality",
    "qtype", "answer_type"}. Not selected by how the model answers them."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i, s in enumerate(samples(n, seed, "case")):
        want = CASE_QTYPES[i % len(CASE_QTYPES)]
        qa = next((q for q in s.qas if q["qtype"] == want), None) or \
            next(q for q in s.qas if q["qtype"] == "count")
        name = "%s_%d.png" % (s.modality.replace("-", ""), i // 4 + 1)
        write_png(os.path.join(out_dir, name), s.image)
        rows.append(dict(image=name, question=qa["question"], answer=qa["answer"],
                         modality=s.modality, qtype=qa["qtype"], answer_type=qa["answer_type"]))
    with open(os.path.join(out_dir, "cases.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", choices=sorted(SEEDS), default="heldout")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else SEEDS[a.split]
    if a.split == "cases":
        rows = write_cases(a.out, a.images, seed)
        print("wrote %s: %d cases (seed %d)" % (a.out, len(rows), seed))
        return 0
    rows = write_split(a.out, a.images, seed, a.split[:2])
    print("wrote %s: %d images, %d questions (seed %d)" % (a.out, a.images, len(rows), seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
