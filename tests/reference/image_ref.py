#!/usr/bin/python3
"""image_ref.py — the reference image preprocessing of Med-MoE / MoE-LLaVA.

What the reference does with an image (LLaVA's eval + HF CLIPImageProcessor,
transformers 4.3x, Pillow 9.4), rewritten with PIL + numpy only (transformers
is not installed here):

  1. Image.open(f).convert("RGB")
  2. image_aspect_ratio == "pad": expand2square(img, tuple(int(x * 255) for x
     in image_mean)) -> background (122, 116, 104), image pasted at
     ((side - w) // 2, (side - h) // 2)
  3. CLIPImageProcessor: to numpy uint8, resize with
     get_resize_output_image_size(default_to_square=False): short side S,
     long side int(S * long / short), via PIL Image.resize(BICUBIC,
     reducing_gap=None) on the uint8 image
  4. center_crop: top = (h - S) // 2, left = (w - S) // 2
  5. rescale: uint8 * (1/255) in float64, .astype(float32)
  6. normalize: (x - mean32) / std32 in float32, then HWC -> CHW

One deliberate deviation (also in model/image.c): Pillow opens a 16-bit
greyscale PNG as mode "I;16" and convert("RGB") *clips* it to 0..255, which
whitens most X-rays. We keep the high byte instead, as PIL already does for
16-bit RGB/RGBA/LA PNGs.

Contract used by the PyTorch reference model:
    preprocess(path_or_bytes, size, pad=True) -> np.ndarray float32 [3, S, S]

CLI (used by ctest `image`):  image_ref.py gen <dir>   writes test images,
reference outputs and a manifest the C test reads.
"""
import io
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_RGB = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), as LLaVA


def load_rgb(path_or_bytes):
    """Image.open(...).convert("RGB"), with the 16-bit grey fix above."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        im = Image.open(io.BytesIO(bytes(path_or_bytes)))
    else:
        im = Image.open(path_or_bytes)
    im.load()
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        a = np.array(im).astype(np.uint32)
        im = Image.fromarray((a >> 8).astype(np.uint8), "L")
    return im.convert("RGB")


def expand2square(pil_img, background_color):
    """LLaVA's expand2square, verbatim in behaviour."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def resize_output_size(h, w, size):
    """HF get_resize_output_image_size(default_to_square=False) -> (h, w)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def clip_uint8(img, size):
    """Steps 3-4 on an RGB PIL image: the uint8 [S, S, 3] crop."""
    arr = np.array(img)
    h, w = arr.shape[:2]
    oh, ow = resize_output_size(h, w, size)
    pil = Image.fromarray(arr)
    arr = np.array(pil.resize((ow, oh), resample=Image.BICUBIC, reducing_gap=None))
    top, left = (oh - size) // 2, (ow - size) // 2
    return arr[top:top + size, left:left + size]


def preprocess(path_or_bytes, size, pad=True):
    """The tower's input for one image: float32 [3, size, size]."""
    img = load_rgb(path_or_bytes)
    if pad:
        img = expand2square(img, PAD_RGB)
    arr = clip_uint8(img, size)
    x = (arr * (1 / 255)).astype(np.float32)
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# --------------------------------------------------------------------------
# Test data generation
# --------------------------------------------------------------------------

def _png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]


def png_rgb_bytes(a, interlace=False):
    """An RGB PNG Pillow cannot write: 16-bit (a: uint16) and/or Adam7
    interlaced. a: [h, w, 3] uint8 or uint16; filter type 0 on every row."""
    h, w, _ = a.shape
    depth, dt = (16, ">u2") if a.dtype == np.uint16 else (8, "u1")
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    raw = b""
    for xs, ys, xstep, ystep in passes:
        sub = a[ys::ystep, xs::xstep]
        if sub.size:
            raw += b"".join(b"\0" + row.astype(dt).tobytes() for row in sub)
    return (b"\x89PNG\r\n\x1a\n" +
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, int(interlace))) +
            _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _pattern(rng, w, h):
    """Gradients + sharp edges + noise: exercises filter overshoot/clipping."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1))
    g = (y * 255 // max(h - 1, 1))
    b = ((x // 3 + y // 2) % 2) * 255
    img = np.stack([r, g, b], -1).astype(np.int32)
    img += rng.integers(-40, 41, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(1234)
    files = []  # (name, extra-sizes)

    def save(name, im, **kw):
        im.save(os.path.join(out, name), **kw)
        files.append(name)

    for w, h in [(37, 23), (23, 37), (64, 64), (100, 7), (7, 100), (1, 1), (33, 32)]:
        save(f"rgb_{w}x{h}.png", Image.fromarray(_pattern(rng, w, h)))
    a = _pattern(rng, 37, 23)
    alpha = rng.integers(0, 256, size=(23, 37, 1), dtype=np.uint8)
    save("rgba_37x23.png", Image.fromarray(np.concatenate([a, alpha], -1), "RGBA"))
    save("grey_23x37.png", Image.fromarray(_pattern(rng, 23, 37)[..., 0], "L"))
    la = np.stack([_pattern(rng, 30, 20)[..., 0], _pattern(rng, 30, 20)[..., 1]], -1)
    save("greyalpha_30x20.png", Image.fromarray(la, "LA"))
    pal = Image.fromarray(_pattern(rng, 41, 29)).quantize(colors=50)
    save("palette_41x29.png", pal)
    palt = Image.fromarray(_pattern(rng, 29, 41)).quantize(colors=16)
    save("palette_trns_29x41.png", palt, transparency=3)
    save("bilevel_45x31.png", Image.fromarray(_pattern(rng, 45, 31)[..., 2]).convert("1"))
    g16 = (rng.integers(0, 65536, size=(25, 39))).astype(np.uint16)
    save("grey16_39x25.png", Image.fromarray(g16))
    for name, a, il in [
            ("rgb16_31x19.png", rng.integers(0, 65536, size=(19, 31, 3)).astype(np.uint16), 0),
            ("adam7_27x21.png", _pattern(rng, 27, 21), 1),
            ("adam7_rgb16_5x3.png", rng.integers(0, 65536, size=(3, 5, 3)).astype(np.uint16), 1)]:
        with open(os.path.join(out, name), "wb") as f:
            f.write(png_rgb_bytes(a, il))
        files.append(name)
    save("rgb_37x23.jpg", Image.fromarray(_pattern(rng, 37, 23)), quality=90)
    save("rgb_64x64_q75.jpg", Image.fromarray(_pattern(rng, 64, 64)), quality=75)
    save("rgb_23x37_444.jpg", Image.fromarray(_pattern(rng, 23, 37)), quality=95,
         subsampling=0)
    save("prog_100x7.jpg", Image.fromarray(_pattern(rng, 100, 7)), progressive=True)
    save("grey_50x40.jpg", Image.fromarray(_pattern(rng, 50, 40)[..., 1], "L"))
    # Real-size case: 336 output, downscaling by ~2 (wider filter support).
    save("rgb_700x500.jpg", Image.fromarray(_pattern(rng, 700, 500)), quality=85)
    save("rgb_500x700.png", Image.fromarray(_pattern(rng, 500, 700)))
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(os.path.join(out, "cmyk_8x8.jpg"))

    lines = []
    for name in files:
        img = load_rgb(os.path.join(out, name))
        w, h = img.size
        rgbname = name + ".rgb"
        np.array(img).tofile(os.path.join(out, rgbname))
        lines.append(f"D {name} {w} {h} {rgbname}")
        sizes = [32, 336] if w * h > 100000 else [32, 13]
        if w == h and w not in sizes:
            sizes.append(w)  # identity resize: Pillow skips both passes
        for s in sizes:
            for pad in (1, 0):
                ref = name + f".s{s}.p{pad}.f32"
                preprocess(os.path.join(out, name), s, bool(pad)).tofile(os.path.join(out, ref))
                lines.append(f"P {name} {s} {pad} {ref}")
        up = (w + 3, h + 1) if w * h > 100000 else (w * 2 + 1, h * 3)
        for tw, th in [up, (max(w // 3, 1), max(h // 2, 1)), (17, 60)]:
            ref = name + f".r{tw}x{th}.rgb"
            np.array(img.resize((tw, th), Image.BICUBIC)).tofile(os.path.join(out, ref))
            lines.append(f"R {name} {tw} {th} {ref}")
    lines.append("E cmyk_8x8.jpg EUNSUPPORTED CMYK")
    with open(os.path.join(out, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "gen":
        generate(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "preprocess":
        # image_ref.py preprocess <image> [size] [pad 0/1] -> prints stats
        x = preprocess(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 336,
                       (sys.argv[4] != "0") if len(sys.argv) > 4 else True)
        print(x.shape, x.dtype, float(x.min()), float(x.max()), float(x.mean()))
    else:
        sys.exit(__doc__)
