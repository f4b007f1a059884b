#!/usr/bin/python3
"""Images for bench_dicom (usage: make_images.py OUTDIR): each DICOM beside a PNG of the same
size, made once (kept when present).

  ct512.dcm      512 x 512 CT slice, signed 16-bit HU, rescale + a window  | ct512.png (8-bit grey)
  xray3000.dcm   3000 x 3000 X-ray, 12 bits stored in 16, MONOCHROME1, window | xray3000.png
  j2k2048.dcm    2048 x 2048, 12-bit, JPEG 2000 lossless (GDCM encodes it)  | j2k2048.png
"""
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from dicom_synth import image_dataset  # noqa: E402


def phantom(n, lo, hi, seed):
    """Smooth anatomy-like content plus noise (compresses like a real image, not like zeros)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n] / n - 0.5
    body = (x ** 2 / 0.16 + y ** 2 / 0.12) < 1
    v = np.where(body, 0.45 + 0.25 * np.sin(9 * x) * np.cos(7 * y), 0.0)
    v += 0.3 * ((x - 0.1) ** 2 + (y + 0.05) ** 2 < 0.01)
    v += rng.normal(0, 0.02, (n, n))
    return np.clip(lo + (hi - lo) * v, lo, hi)


def dicom(path, arr, pr, bits, pi, modality, window=None, intercept=None):
    ds = image_dataset(arr.shape[0], arr.shape[1], pi, 1, 16, bits, pr == 1, modality)
    if intercept is not None:
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.int16 if pr else np.uint16).tobytes()
    ds.save_as(path, write_like_original=False)


def png(path, arr, lo, hi):
    Image.fromarray(np.round((arr - lo) * 255.0 / (hi - lo)).astype(np.uint8), "L").save(path)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(os.path.join(out, "ct512.png")):
        a = phantom(512, 0, 2000, 1)  # stored; HU = stored - 1024
        dicom(os.path.join(out, "ct512.dcm"), a, 1, 16, "MONOCHROME2", "CT", (40, 400), -1024)
        png(os.path.join(out, "ct512.png"), a, 0, 2000)
    if not os.path.exists(os.path.join(out, "xray3000.png")):
        a = phantom(3000, 0, 4095, 2)
        dicom(os.path.join(out, "xray3000.dcm"), a, 0, 12, "MONOCHROME1", "DX", (2048, 4096))
        png(os.path.join(out, "xray3000.png"), a, 0, 4095)
    if not os.path.exists(os.path.join(out, "j2k2048.png")):
        import gdcm
        a = phantom(2048, 0, 4095, 3)
        raw = os.path.join(out, "j2k2048-raw.dcm")
        dicom(raw, a, 0, 12, "MONOCHROME2", "MG", (2048, 4096))
        r = gdcm.ImageReader()
        r.SetFileName(raw)
        if not r.Read():
            sys.exit("gdcm could not read %s" % raw)
        ch = gdcm.ImageChangeTransferSyntax()
        ch.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEG2000Lossless))
        ch.SetInput(r.GetImage())
        if not ch.Change():
            sys.exit("gdcm could not encode JPEG 2000")
        w = gdcm.ImageWriter()
        w.SetFileName(os.path.join(out, "j2k2048.dcm"))
        w.SetFile(r.GetFile())
        w.SetImage(ch.GetOutput())
        if not w.Write():
            sys.exit("gdcm could not write j2k2048.dcm")
        os.unlink(raw)
        png(os.path.join(out, "j2k2048.png"), a, 0, 4095)


if __name__ == "__main__":
    main()
