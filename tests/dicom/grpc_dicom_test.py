#!/usr/bin/python3
"""DICOM through the gRPC front door (application/dicom), black box.

    grpc_dicom_test.py --router BIN --expert BIN --run BIN --cli BIN --model DIR --image PNG
                       --workdir DIR

Starts a router + experts on loopback (tests/grpc/grpclib.py) with an audit log, then:
  1. an RGB DICOM made from the test PNG (same pixels) answers exactly as the PNG does
     (tokens equal to medmoe-run on the PNG), sent with media_type "" (sniffed) and
     "application/dicom"; also through the Python and C CLIs with a .dcm path (and the Node
     client with --window lung, where its node_modules are installed);
  2. a CT slice (signed 16-bit, rescale, a file window): Classify with window "lung" equals
     medmoe-run --window lung, and differs from the file's window (the option really travels);
  3. a 3-frame DICOM: frame 1 equals medmoe-run --frame 1 and differs from the middle frame;
  4. refusals with INVALID_ARGUMENT naming the field: unknown preset, a frame past the end, a CT
     preset on a non-CT image, an SR (no pixels), garbage and a truncated file as
     application/dicom;
  5. privacy: the patient name, ID and birth date written into every file appear in no log line,
     no audit line and no error message.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "grpc"))
import grpclib as G  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from dicom_synth import CT_IMAGE, SECONDARY_CAPTURE, image_dataset  # noqa: E402

D, MC, TestFailure, log = G.D, G.MC, G.TestFailure, G.log
QUESTION = "What modality is this image?"
CANDIDATES = ["ct", "mri", "x-ray", "pathology"]
NAME, PID, BIRTH = "Quokkason^Zebedee", "PID-88442211", "19310917"


def make_files(png_path, out):
    """rgb.dcm (the PNG's pixels), ct.dcm (CT slice), mf.dcm (3 frames), sr.dcm (no pixels)."""
    from PIL import Image

    rgb = np.asarray(Image.open(png_path).convert("RGB"))
    grey = np.asarray(Image.open(png_path).convert("L")).astype(np.int32)
    h, w = grey.shape

    def base(pi, spp, ba, pr, modality, sop_class=SECONDARY_CAPTURE):
        return image_dataset(h, w, pi, spp, ba, None, pr == 1, modality, sop_class, (NAME, PID, BIRTH))

    files = {}
    ds = base("RGB", 3, 8, 0, "XC")
    ds.PixelData = rgb.tobytes()
    files["rgb"] = os.path.join(out, "rgb.dcm")
    ds.save_as(files["rgb"], write_like_original=False)

    ds = base("MONOCHROME2", 1, 16, 1, "CT", CT_IMAGE)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = (grey * 8).astype(np.int16).tobytes()  # -1024 .. 1016 HU
    files["ct"] = os.path.join(out, "ct.dcm")
    ds.save_as(files["ct"], write_like_original=False)

    ds = base("MONOCHROME2", 1, 8, 0, "MR")
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([grey, 255 - grey, (grey * 3) % 256]).astype(np.uint8).tobytes()
    files["mf"] = os.path.join(out, "mf.dcm")
    ds.save_as(files["mf"], write_like_original=False)

    ds = base("MONOCHROME2", 1, 8, 0, "SR", "1.2.840.10008.5.1.4.1.1.88.11")
    for k in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
              "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, k)
    files["sr"] = os.path.join(out, "sr.dcm")
    ds.save_as(files["sr"], write_like_original=False)
    return files


def run_ref(a, cl, image, extra):
    """medmoe-run --json on image with extra arguments (window, frame): a Classify reference."""
    cmd = [a.run, "--model", a.model, "--vision", os.path.join(a.model, "clip"), "--json", "--question",
           QUESTION, "--image", image, "--candidates", ",".join(CANDIDATES), "--max-tokens", "0"] + extra
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise TestFailure("medmoe-run %s failed: %s" % (" ".join(extra), p.stderr[-1500:]))
    return D.parse_json_stdout(p.stdout)


def logprobs(res):
    return {c["text"]: float(c["logprob"]) for c in res["candidates"]}


def differs(x, y, what):
    d = max(abs(x[k] - y[k]) for k in x)
    if d < 1e-4:
        raise TestFailure("%s: the logprobs do not change (max diff %.2g): the option had no effect" % (what, d))
    log("%s: logprobs differ by up to %.4f, as they should" % (what, d))


def main():
    ap = argparse.ArgumentParser()
    for k in ("router", "expert", "run", "cli", "model", "image", "workdir"):
        ap.add_argument("--" + k, required=True)
    ap.add_argument("--node-modules")
    a = ap.parse_args()
    a.workdir = D.fresh_dir(a.workdir)
    D.main_wrapper(lambda: scenario(a))


def scenario(a):
    files = make_files(a.image, a.workdir)
    raw = {k: open(p, "rb").read() for k, p in files.items()}
    with G.GrpcCluster({"router": a.router, "expert": a.expert, "run": a.run}, a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=8)
        audit = os.path.join(cl.workdir, "audit.jsonl")
        salt = os.urandom(32)
        with open(os.path.join(cl.workdir, "audit.salt"), "wb") as f:
            f.write(salt)
        cl.start(a.model, router_extra=["--audit-log", audit, "--audit-salt-file",
                                        os.path.join(cl.workdir, "audit.salt")])
        c = cl.client(t)

        # 1. RGB DICOM == the PNG, sniffed and with its media type; the Python CLI with a .dcm path
        ref = G.reference(cl, QUESTION, a.image, 16)
        ans = c.ask(QUESTION, image=raw["rgb"], max_tokens=16, case_id="dcm-sniffed", timeout=60)
        G.check_answer(MC.to_dict(ans), ref, "RGB DICOM (sniffed) vs the PNG", case_id="dcm-sniffed")
        ans = c.ask(QUESTION, image=raw["rgb"], media_type="application/dicom", max_tokens=16,
                    case_id="dcm-typed", timeout=60)
        G.check_answer(MC.to_dict(ans), ref, "RGB DICOM (application/dicom) vs the PNG", case_id="dcm-typed")
        py = os.path.join(HERE, "..", "..", "clients", "python", "medmoe_client.py")
        p = subprocess.run([sys.executable, py, "ask", "--server", cl.target, "--key", t.key, "--image",
                            files["rgb"], "--question", QUESTION, "--max-tokens", "16", "--json",
                            "--stubs", cl.stub_dir], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise TestFailure("python CLI with a .dcm: exit %d: %s" % (p.returncode, p.stderr[-1000:]))
        G.check_answer(json.loads(p.stdout), ref, "python CLI, rgb.dcm")
        p = subprocess.run([a.cli, "ask", "--server", cl.target, "--key", t.key, "--image", files["rgb"],
                            "--question", QUESTION, "--max-tokens", "16", "--json"],
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise TestFailure("C CLI with a .dcm: exit %d: %s" % (p.returncode, p.stderr[-1000:]))
        G.check_answer(json.loads(p.stdout), ref, "C CLI, rgb.dcm")
        if a.node_modules and os.path.isdir(os.path.join(a.node_modules, "@grpc", "grpc-js")):
            p = subprocess.run(["node", G.NODE_CLIENT, "classify", "--server", cl.target, "--key", t.key,
                                "--image", files["ct"], "--window", "lung", "--question", QUESTION,
                                "--candidates", ",".join(CANDIDATES), "--json"],
                               capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, NODE_PATH=a.node_modules))
            if p.returncode != 0:
                raise TestFailure("Node client with a .dcm: exit %d: %s" % (p.returncode, p.stderr[-1000:]))
            G.check_classify(json.loads(p.stdout), run_ref(a, cl, files["ct"], ["--window", "lung"]),
                             "Node client, ct.dcm --window lung")
        else:
            log("no node_modules at %r: the Node client is not checked here" % a.node_modules)

        # 2. the lung window travels: equal to medmoe-run --window lung, unlike the file's window
        ref_lung = run_ref(a, cl, files["ct"], ["--window", "lung"])
        ref_file = run_ref(a, cl, files["ct"], [])
        got = MC.to_dict(c.classify(QUESTION, CANDIDATES, image=raw["ct"], dicom_window="lung",
                                    case_id="ct-lung", timeout=60))
        G.check_classify(got, ref_lung, "CT, window lung", case_id="ct-lung")
        got_file = MC.to_dict(c.classify(QUESTION, CANDIDATES, image=raw["ct"], case_id="ct-file", timeout=60))
        G.check_classify(got_file, ref_file, "CT, the file's window", case_id="ct-file")
        differs(logprobs(got), logprobs(got_file), "CT lung window vs the file's window")

        # 3. the frame travels
        ref_f1 = run_ref(a, cl, files["mf"], ["--frame", "1"])
        got = MC.to_dict(c.classify(QUESTION, CANDIDATES, image=raw["mf"], dicom_frame=1, case_id="mf-1",
                                    timeout=60))
        G.check_classify(got, ref_f1, "multi-frame, frame 1", case_id="mf-1")
        got_mid = MC.to_dict(c.classify(QUESTION, CANDIDATES, image=raw["mf"], case_id="mf-mid", timeout=60))
        G.check_classify(got_mid, run_ref(a, cl, files["mf"], []), "multi-frame, middle frame")
        differs(logprobs(got), logprobs(got_mid), "frame 1 vs the middle frame")

        # 4. refusals
        IA = "INVALID_ARGUMENT"
        errs = [
            G.expect_code(lambda: c.ask(QUESTION, image=raw["ct"], dicom_window="liver", timeout=20), IA,
                          "an unknown window preset", field="image.dicom.window"),
            G.expect_code(lambda: c.ask(QUESTION, image=raw["mf"], dicom_frame=4, timeout=20), IA,
                          "frame 4 of 3", field="frame"),
            G.expect_code(lambda: c.ask(QUESTION, image=raw["rgb"], dicom_window="bone", timeout=20), IA,
                          "a CT preset on an RGB photo", field="window"),
            G.expect_code(lambda: c.ask(QUESTION, image=raw["mf"], dicom_window="brain", timeout=20), IA,
                          "a CT preset on an MR image", field="window"),
            G.expect_code(lambda: c.ask(QUESTION, image=raw["sr"], timeout=20), IA,
                          "an SR (no pixels)", field="image"),
            G.expect_code(lambda: c.ask(QUESTION, image=b"not dicom at all " * 20, media_type="application/dicom",
                                        timeout=20), IA, "garbage as application/dicom", field="image"),
            G.expect_code(lambda: c.classify(QUESTION, CANDIDATES, image=raw["ct"][:len(raw["ct"]) // 2],
                                             timeout=20), IA, "a truncated CT", field="image"),
        ]
        # still serving after all that
        G.check_answer(MC.to_dict(c.ask(QUESTION, image=raw["rgb"], max_tokens=16, timeout=60)), ref,
                       "RGB DICOM after the refusals")

        # 5. no patient attribute anywhere
        cl.stop_router()
        texts = {}
        for root, _, names in os.walk(cl.workdir):
            for n in names:
                if n.endswith((".log", ".jsonl", ".txt", ".json")):
                    with open(os.path.join(root, n), errors="replace") as f:
                        texts[os.path.join(root, n)] = f.read()
        texts["error messages"] = "\n".join(e.details() or "" for e in errs)
        # the audit names the instance only as SHA-256(salt || SOP Instance UID)
        import pydicom
        uid = str(pydicom.dcmread(files["ct"]).SOPInstanceUID)
        recs = [json.loads(line) for line in texts[audit].splitlines() if line.strip()]
        # the case's closing record ("event": "end") carries the outcome and the dicom field
        lung = [r for r in recs if r.get("case_id") == "ct-lung" and r.get("event", "end") == "end"]
        want = {"sop_instance_uid_sha256": hashlib.sha256(salt + uid.encode()).hexdigest(),
                "modality": "CT", "window": "lung", "frame": 0}
        if len(lung) != 1 or lung[0].get("dicom") != want:
            raise TestFailure("audit record of ct-lung: %s, want dicom = %s" % (lung, want))
        if uid in texts[audit]:
            raise TestFailure("the audit log holds a SOP Instance UID in clear")
        if not any("dicom" in r for r in recs if r.get("case_id") == "mf-1"):
            raise TestFailure("the audit record of mf-1 has no dicom field")
        if not any(n.endswith("audit.jsonl") for n in texts) or not texts[audit].strip():
            raise TestFailure("no audit log written at %s" % audit)
        for needle in (NAME, NAME.replace("^", " "), "Quokkason", "Zebedee", PID, BIRTH):
            for path, text in texts.items():
                if needle in text:
                    raise TestFailure("patient attribute %r appears in %s" % (needle, path))
        log("no patient name, ID or birth date in %d log/audit files or the error messages" % (len(texts) - 1))


if __name__ == "__main__":
    main()
