#!/usr/bin/python3
"""Writes deterministic test images (no randomness, no timestamps in the files).

    make_test_image.py OUT_DIR

  case.png   45×30 RGB, landscape (exercises pad-to-square), gradients + a bright disc
             + a dark bar, like a crude scan
  case.jpg   37×50 RGB JPEG (quality 90), portrait
  gray.png   30×30 8-bit grayscale (mode L), as many medical PNGs are
"""

import os
import sys

import numpy as np
from PIL import Image


def scan(w, h, phase):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 60 + 120 * x / max(w - 1, 1)
    g = 40 + 150 * y / max(h - 1, 1)
    b = 128 + 100 * np.sin((x + 2 * y) / 5.0 + phase)
    img = np.stack([r, g, b], -1)
    cx, cy, rad = 0.62 * w, 0.45 * h, 0.22 * min(w, h)
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= rad ** 2
    img[disc] = [235, 225, 210]
    img[int(0.7 * h):int(0.8 * h), int(0.1 * w):int(0.5 * w)] = [20, 30, 25]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    Image.fromarray(scan(45, 30, 0.0), "RGB").save(os.path.join(out, "case.png"), optimize=False)
    Image.fromarray(scan(37, 50, 1.0), "RGB").save(os.path.join(out, "case.jpg"), quality=90)
    gray = scan(30, 30, 2.0).mean(-1).astype(np.uint8)
    Image.fromarray(gray, "L").save(os.path.join(out, "gray.png"), optimize=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
