#!/bin/sh
# make demo — answers sample cases with the engine.
# Until the trained demo model exists (issue: "Run it like a hospital would"), this uses a tiny
# RANDOM Med-MoE checkpoint in the real layout: the answers are gibberish, but every step is real —
# image decode, CLIP tower, projector, MoE decoder, the experts each case was routed to.
set -eu
BUILD=${BUILD:-build}
DEMO=$BUILD/demo
PY=/usr/bin/python3
mkdir -p "$DEMO"
[ -f "$DEMO/tiny/config.json" ] || $PY tools/make_tiny_checkpoint.py --out "$DEMO/tiny" --backbone stablelm --dtype bf16 >/dev/null
[ -f "$DEMO/images/case.png" ] || $PY tests/make_test_image.py "$DEMO/images" >/dev/null
RUN="$BUILD/model/medmoe-run --model $DEMO/tiny --vision $DEMO/tiny/clip"
for q in "What modality is this image?" "Is there a lesion in the left lung?"; do
  echo "== case: $DEMO/images/case.png — $q"
  $RUN --image "$DEMO/images/case.png" --question "$q" --max-tokens 12 --json |
    $PY -c 'import json,sys; d=json.load(sys.stdin); print("answer:", repr(d["answer"]));
[print("  MoE layer %d: image tokens per expert %s, text tokens per expert %s" % (s["layer"], s["image_tokens_per_expert"], s["text_tokens_per_expert"])) for s in d["expert_summary"]]'
done
echo "== classification"
$RUN --image "$DEMO/images/case.png" --question "Which modality?" --candidates "ct,mri,x-ray,pathology"
