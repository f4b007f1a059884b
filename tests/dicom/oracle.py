#!/usr/bin/python3
"""DICOM decoding (model/dicom.c, through mm-dicom-dump) against pydicom.

usage: oracle.py MM_DICOM_DUMP WORKDIR

The oracle is pydicom 2.3's own display pipeline, written independently of
ours: Dataset.pixel_array (its numpy/RLE handlers, GDCM for JPEG-family
syntaxes), apply_modality_lut, apply_windowing / apply_voi, convert_color_space,
apply_color_lut. For greyscale, pydicom's windowing output range [y_min, y_max]
is mapped linearly onto 0..255 (we produce 0..255 directly), so the same
window line gives the same pixel up to rounding: tolerance +-1 (an 8-bit step).
Colour conversion is within +-1 for the same reason (pydicom rounds its float
matrix product; we round per channel). Everything else (RGB pass-through,
palettes of 8-bit entries) is exact, and the test reports the largest
difference per file.

Files: every *.dcm in pydicom's data/test_files, plus files generated here
(WORKDIR/gen) for what those lack: MONOCHROME1, PALETTE COLOR, planar
configuration 1, Modality and VOI LUT Sequences, LINEAR_EXACT and SIGMOID
windows, 12-bit stored below a high bit, signed 8/12-bit, 1-bit multi-frame,
native multi-frame with distinct frames (frame choice checked), CT presets,
and deliberately broken files (truncations, lying headers, garbage
codestreams). A file pydicom cannot decode must give exit status 2 and a
message ("STATUS: dicom: ..."); any other exit (a signal, an ASan report)
fails the test.
"""
import copy
import glob
import os
import subprocess
import sys
import warnings

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixel_data_handlers.util import (apply_color_lut, apply_modality_lut, apply_voi,
                                              apply_windowing, convert_color_space)
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from dicom_synth import image_dataset  # noqa: E402

warnings.filterwarnings("ignore")
# pydicom "decodes" these only because its GDCM handler ignores GDCM's failure and returns the
# zero-filled buffer: ours to refuse. JPEG2000-embedded-sequence-delimiter.dcm: an item
# delimiter inside the data cuts the only fragment to 250 bytes for a 256 x 1024 x 16-bit
# image; GDCM's OpenJPEG reports "opj_setup_decoder failure".
MUST_REFUSE = {"JPEG2000-embedded-sequence-delimiter.dcm"}
PRESETS = {"lung": (1500, -600), "mediastinum": (350, 50), "bone": (1800, 400), "brain": (80, 40)}


def run_dump(dump, path, *args):
    p = subprocess.run([dump, path, *args], capture_output=True, timeout=120)
    if p.returncode == 0:
        data = p.stdout
        head, rest = data.split(b"\n", 1)
        assert head == b"P6", head
        dims, rest = rest.split(b"\n", 1)
        w, h = map(int, dims.split())
        _, rest = rest.split(b"\n", 1)
        return 0, np.frombuffer(rest, np.uint8).reshape(h, w, 3), ""
    return p.returncode, None, p.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]


def y_range(ds):
    """pydicom's apply_windowing output range, replicated (see its source)."""
    bs = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    if ds.PixelRepresentation == 0:
        lo, hi = 0.0, 2.0 ** bs - 1
    else:
        lo, hi = -(2.0 ** (bs - 1)), 2.0 ** (bs - 1) - 1
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        lo = lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hi = hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return lo, hi


def to8(y):
    return np.clip(np.floor(np.asarray(y, np.float64) + 0.5), 0, 255).astype(np.uint8)


def first(v):
    return float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)


def expected(ds, frame, window):
    """What a viewer shows, by pydicom: (H, W, 3) uint8."""
    arr = ds.pixel_array
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    if nf > 1:
        arr = arr[frame]
    pi = ds.PhotometricInterpretation
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        m = apply_modality_lut(arr, ds).astype(np.float64)
        wds = copy.deepcopy(ds)
        has_win = "WindowCenter" in ds and "WindowWidth" in ds
        if window in PRESETS:
            wds.WindowWidth, wds.WindowCenter = PRESETS[window]
            if "VOILUTFunction" in wds:
                del wds.VOILUTFunction
            has_win = True
        elif window == "full":
            has_win = False
        fn = str(wds.get("VOILUTFunction", "LINEAR")).upper()
        if has_win:
            ww = first(wds.WindowWidth)
            if ww < 1 if fn == "LINEAR" else ww <= 0:
                has_win = False
            else:  # the first window only
                wds.WindowWidth, wds.WindowCenter = ww, first(wds.WindowCenter)
        if has_win:
            y = apply_windowing(m.copy(), wds)
            lo, hi = y_range(wds)
            y8 = to8((y - lo) * 255.0 / (hi - lo))
        elif window in ("", "auto") and ds.get("VOILUTSequence"):
            y = apply_voi(np.floor(m).astype(np.int64), ds)
            bits = ds.VOILUTSequence[0].LUTDescriptor[2]
            y8 = to8(y.astype(np.float64) * 255.0 / (2 ** bits - 1))
        else:
            lo, hi = m.min(), m.max()
            y8 = to8((m - lo) * 255.0 / (hi - lo)) if hi > lo else np.zeros(m.shape, np.uint8)
        if pi == "MONOCHROME1":
            y8 = 255 - y8
        return np.repeat(y8[..., None], 3, axis=2)
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        if rgb.dtype == np.uint16:
            return ((rgb.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return rgb.astype(np.uint8)
    if pi in ("YBR_FULL", "YBR_FULL_422"):
        return convert_color_space(arr, pi, "RGB")
    bs = int(ds.BitsStored)
    if bs <= 8:
        return arr.astype(np.uint8)
    return to8(arr.astype(np.float64) * 255.0 / (2.0 ** bs - 1))


# ---------------------------------------------------------------- generated files
def base_ds(rows, cols, pi="MONOCHROME2", spp=1, ba=16, bs=None, pr=0, modality="OT"):
    return image_dataset(rows, cols, pi, spp, ba, bs, pr == 1, modality,
                         patient=("Oracle^Test", "ORACLE-1", "19000101"))


def save(ds, path, ts=None):
    if ts:
        ds.file_meta.TransferSyntaxUID = ts
        ds.is_little_endian = ts != ExplicitVRBigEndian
        ds.is_implicit_VR = ts == ImplicitVRLittleEndian
    ds.save_as(path, write_like_original=False)
    return path


def ramp(rows, cols, lo, hi, dtype):
    y, x = np.mgrid[0:rows, 0:cols]
    v = lo + (hi - lo) * (x * rows + y) / (rows * cols - 1)
    return np.round(v).astype(dtype)


def generate(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(13)
    files = {}

    # CT, signed 16-bit with rescale and a window; presets run on it too
    ds = base_ds(64, 80, pr=1, bs=16, modality="CT")
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = [40, 400], [400, 1500]
    ds.PixelData = ramp(64, 80, -1000, 3000, np.int16).tobytes()
    files["ct_signed_window.dcm"] = save(ds, f"{out}/ct_signed_window.dcm")
    # the same, big endian and implicit
    files["ct_bigendian.dcm"] = save(copy.deepcopy(ds), f"{out}/ct_bigendian.dcm", ExplicitVRBigEndian)
    files["ct_implicit.dcm"] = save(copy.deepcopy(ds), f"{out}/ct_implicit.dcm", ImplicitVRLittleEndian)

    # MONOCHROME1, 12 bits stored in 16, no window: full range
    ds = base_ds(40, 50, pi="MONOCHROME1", bs=12)
    ds.PixelData = ramp(40, 50, 100, 4000, np.uint16).tobytes()
    files["mono1_12bit.dcm"] = save(ds, f"{out}/mono1_12bit.dcm")

    # signed 12-bit in 16 with a fractional rescale and LINEAR_EXACT window
    ds = base_ds(32, 48, bs=12, pr=1)
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "10"
    ds.WindowCenter, ds.WindowWidth = 100, 301
    ds.VOILUTFunction = "LINEAR_EXACT"
    v = ramp(32, 48, -2048, 2047, np.int16)
    ds.PixelData = v.tobytes()
    files["signed12_linear_exact.dcm"] = save(ds, f"{out}/signed12_linear_exact.dcm")

    # SIGMOID window, unsigned 8-bit
    ds = base_ds(30, 30, ba=8)
    ds.WindowCenter, ds.WindowWidth = 128, 60
    ds.VOILUTFunction = "SIGMOID"
    ds.PixelData = ramp(30, 30, 0, 255, np.uint8).tobytes()
    files["sigmoid8.dcm"] = save(ds, f"{out}/sigmoid8.dcm")

    # signed 8-bit, no window
    ds = base_ds(16, 20, ba=8, pr=1)
    ds.PixelData = ramp(16, 20, -128, 127, np.int8).tobytes()
    files["signed8.dcm"] = save(ds, f"{out}/signed8.dcm")

    # Modality LUT Sequence (12-bit table) then a window on its output
    ds = base_ds(32, 32, bs=10)
    it = Dataset()
    it.add_new(0x00283002, "US", [512, 100, 16])  # LUT Descriptor (pydicom: 8 or 16)
    it.ModalityLUTType = "US"
    it.add_new(0x00283006, "US", [int(40000 * (i / 511) ** 2) for i in range(512)])  # LUT Data
    ds.ModalityLUTSequence = [it]
    ds.WindowCenter, ds.WindowWidth = 1500, 2000
    ds.PixelData = ramp(32, 32, 0, 1023, np.uint16).tobytes()
    files["modality_lut_seq.dcm"] = save(ds, f"{out}/modality_lut_seq.dcm")

    # VOI LUT Sequence, no window
    ds = base_ds(32, 32, bs=12)
    it = Dataset()
    it.add_new(0x00283002, "US", [1024, 1000, 16])
    it.add_new(0x00283006, "OW", np.array([int(65535 * (i / 1023) ** 0.5) for i in range(1024)],
                                          np.uint16).tobytes())
    ds.VOILUTSequence = [it]
    ds.PixelData = ramp(32, 32, 500, 2500, np.uint16).tobytes()
    files["voi_lut_seq.dcm"] = save(ds, f"{out}/voi_lut_seq.dcm")

    # PALETTE COLOR, 8-bit indices, 16-bit entries
    ds = base_ds(24, 36, pi="PALETTE COLOR", ba=8)
    for c, f in (("Red", lambda i: i * 257), ("Green", lambda i: (255 - i) * 257),
                 ("Blue", lambda i: (i * 7 % 256) * 257)):
        ds.add_new({"Red": 0x00281101, "Green": 0x00281102, "Blue": 0x00281103}[c], "US",
                   [256, 0, 16])
        setattr(ds, f"{c}PaletteColorLookupTableData",
                np.array([f(i) for i in range(256)], np.uint16).tobytes())
    ds.PixelData = rng.integers(0, 256, (24, 36), dtype=np.uint8).tobytes()
    files["palette8.dcm"] = save(ds, f"{out}/palette8.dcm")

    # RGB planar configuration 1, and RGB 16-bit native
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    ds = base_ds(20, 30, pi="RGB", spp=3, ba=8)
    ds.PlanarConfiguration = 1
    ds.PixelData = img.transpose(2, 0, 1).tobytes()
    files["rgb_planar1.dcm"] = save(ds, f"{out}/rgb_planar1.dcm")
    ds = base_ds(20, 30, pi="YBR_FULL", spp=3, ba=8)
    ds.PixelData = img.tobytes()
    files["ybr_full_native.dcm"] = save(ds, f"{out}/ybr_full_native.dcm")

    # native multi-frame greyscale with distinct frames (frame choice)
    ds = base_ds(16, 16, modality="MR")
    ds.NumberOfFrames = 5
    ds.PixelData = np.stack([np.full((16, 16), 100 * k, np.uint16) + ramp(16, 16, 0, 50, np.uint16)
                             for k in range(5)]).tobytes()
    files["multiframe5.dcm"] = save(ds, f"{out}/multiframe5.dcm")

    # 1-bit, 3 frames of 10 x 13 (frames not byte-aligned)
    ds = base_ds(10, 13, ba=1)
    ds.NumberOfFrames = 3
    bits = rng.integers(0, 2, 3 * 10 * 13, dtype=np.uint8)
    ds.PixelData = np.packbits(bits, bitorder="little").tobytes()
    files["onebit_3frames.dcm"] = save(ds, f"{out}/onebit_3frames.dcm")

    # deliberately broken: pydicom refuses these too
    ct = open(files["ct_signed_window.dcm"], "rb").read()
    for cut in (100, 132, 300, len(ct) - 1000):
        with open(f"{out}/broken_cut{cut}.dcm", "wb") as f:
            f.write(ct[:cut])
        files[f"broken_cut{cut}.dcm"] = f"{out}/broken_cut{cut}.dcm"
    ds = pydicom.dcmread(files["ct_signed_window.dcm"])
    ds.BitsStored = 20  # more than allocated
    files["broken_bits.dcm"] = save(ds, f"{out}/broken_bits.dcm")
    ds = pydicom.dcmread(files["ct_signed_window.dcm"])
    ds.Rows = 640  # header says more pixels than there are
    files["broken_rows.dcm"] = save(ds, f"{out}/broken_rows.dcm")
    ds = pydicom.dcmread(files["ct_signed_window.dcm"])
    del ds.PixelData
    files["broken_nopixels.dcm"] = save(ds, f"{out}/broken_nopixels.dcm")
    # a JPEG 2000 file whose codestream is garbage after its first bytes
    src = pydicom.dcmread(os.path.join(TEST_FILES, "MR_small_jp2klossless.dcm"))
    frags = list(pydicom.encaps.generate_pixel_data_frame(src.PixelData))
    bad = frags[0][:64] + bytes(rng.integers(0, 256, len(frags[0]) - 64, dtype=np.uint8))
    src.PixelData = pydicom.encaps.encapsulate([bad])
    files["broken_j2k.dcm"] = save(src, f"{out}/broken_j2k.dcm")
    with open(f"{out}/broken_notdicom.dcm", "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + b"\xff" * 500)
    files["broken_notdicom.dcm"] = f"{out}/broken_notdicom.dcm"
    return files


TEST_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")


def main():
    dump, work = sys.argv[1], sys.argv[2]
    files = {os.path.basename(p): p for p in sorted(glob.glob(os.path.join(TEST_FILES, "*.dcm")))}
    files.update(generate(os.path.join(work, "gen")))
    cases = [(n, p, "auto", 0) for n, p in files.items()]
    # presets on the CT slices, a chosen frame on the multi-frame files
    for w in PRESETS:
        cases.append(("ct_signed_window.dcm", files["ct_signed_window.dcm"], w, 0))
        cases.append(("CT_small.dcm", files["CT_small.dcm"], w, 0))
    cases.append(("CT_small.dcm", files["CT_small.dcm"], "full", 0))
    for k in (1, 2, 5):
        cases.append(("multiframe5.dcm", files["multiframe5.dcm"], "auto", k))
    for k in (1, 3):
        cases.append(("onebit_3frames.dcm", files["onebit_3frames.dcm"], "auto", k))
    cases.append(("SC_rgb_rle_2frame.dcm", files["SC_rgb_rle_2frame.dcm"], "auto", 1))
    cases.append(("rtdose.dcm", files["rtdose.dcm"], "auto", 15))

    failures, compared, refused = [], 0, 0
    for name, path, window, frame in cases:
        label = name + (f" --window {window}" if window != "auto" else "") + (
            f" --frame {frame}" if frame else "")
        args = (["--window", window] if window != "auto" else []) + (
            ["--frame", str(frame)] if frame else [])
        try:
            if name.startswith("broken_") or name in MUST_REFUSE:  # ours to refuse, whatever pydicom says
                raise ValueError("deliberately broken")
            ds = pydicom.dcmread(path, force=True)
            nf = int(ds.get("NumberOfFrames", 1) or 1)
            want = expected(ds, (frame - 1) if frame else (nf - 1) // 2, window)
        except Exception as e:  # pydicom cannot decode it: we must refuse cleanly
            rc, _, msg = run_dump(dump, path, *args)
            ok = rc == 2 and msg and ": " in msg[0]
            refused += 1
            print(f"{'ok ' if ok else 'BAD'} {label:48s} pydicom: {type(e).__name__}: "
                  f"{str(e)[:50]} | ours: rc={rc} {msg[0][:100] if msg else ''}")
            if not ok:
                failures.append(f"{label}: want a clean refusal (exit 2), got rc={rc} {msg}")
            continue
        rc, got, msg = run_dump(dump, path, *args)
        if rc != 0:
            print(f"BAD {label:48s} pydicom decodes it, ours: rc={rc} {msg}")
            failures.append(f"{label}: pydicom decodes it, we refused: rc={rc} {msg}")
            continue
        compared += 1
        if got.shape != want.shape:
            failures.append(f"{label}: shape {got.shape} != pydicom {want.shape}")
            print(f"BAD {label:48s} shape {got.shape} != {want.shape}")
            continue
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        mx, n1 = int(diff.max()), int((diff > 0).sum())
        ok = mx <= 1
        print(f"{'ok ' if ok else 'BAD'} {label:48s} {ds.PhotometricInterpretation:13s} "
              f"{str(ds.file_meta.get('TransferSyntaxUID', '?')):24s} max |diff| {mx} "
              f"({n1} samples off by 1)")
        if not ok:
            failures.append(f"{label}: max |diff| {mx} > 1")
    print(f"\n{compared} decoded and compared, {refused} refused as pydicom refuses them, "
          f"{len(failures)} failures")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
