#!/usr/bin/python3
"""make demo — a local cluster (router + one process per expert) on the bundled demo model,
sample cases asked over gRPC through the Python client and the C CLI, each printed with its
answer, the ground truth and the expert that served its image tokens; then a clean stop.

usage: demo.py BUILD_DIR
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def make_dicom(png, path):
    """A CT slice as a PACS would send it, made from a demo PNG: signed 16-bit Hounsfield
    units (stored = 8 * grey, Rescale Intercept -1024), no window (so the full range shows, which
    is the PNG again). The patient attributes are invented, and never reach a log or the audit."""
    import numpy as np
    from PIL import Image
    from dicom_synth import CT_IMAGE, image_dataset
    grey = np.asarray(Image.open(png).convert("L")).astype(np.int16)
    ds = image_dataset(grey.shape[0], grey.shape[1], bits=16, signed=True, modality="CT",
                       sop_class=CT_IMAGE, patient=("Demo^Patient", "DEMO-0001", "19700101"))
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (grey * 8).tobytes()
    ds.save_as(path, write_like_original=False)


def dicom_case(build, server, key, run, cases_dir, cases):
    """One case as DICOM (application/dicom), through the C CLI."""
    c = next((c for c in cases if c["modality"].lower() == "ct"), cases[0])
    dcm = os.path.join(run, os.path.splitext(c["image"])[0] + ".dcm")
    make_dicom(os.path.join(cases_dir, c["image"]), dcm)
    t0 = time.monotonic()
    d = json.loads(sh(os.path.join(build, "clients", "medmoe"), "ask", "--server", server, "--key", key,
                      "--image", dcm, "--question", c["question"], "--max-tokens", "8",
                      "--case-id", "demo-dicom", "--json"))
    ok = c["answer"].lower() in d.get("answer", "").lower()
    print("[DICOM] %s (CT, 16-bit signed HU, made from %s) — %s\n    answer: %-12s truth: %-10s %s"
          "   (%.0f ms, via C CLI, application/dicom)"
          % (os.path.basename(dcm), c["image"], c["question"], d.get("answer", ""), c["answer"],
             "correct" if ok else "WRONG", (time.monotonic() - t0) * 1000))


def main():
    build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
    run = os.path.join(build, "demo-run")
    os.makedirs(run, exist_ok=True)
    model = os.path.join(ROOT, "demo", "model")
    cases_dir = os.path.join(ROOT, "demo", "cases")
    cluster = [sys.executable, os.path.join(ROOT, "orchestration", "medmoe-cluster"),
               "--config", os.path.join(run, "cluster.json")]

    # a tenant for the demo: a fresh API key, only its hash in the tenants file
    key, key_hash = sh(os.path.join(build, "router-node", "medmoe-keygen"), "--api-key").split()[:2]
    with open(os.path.join(run, "tenants.json"), "w") as f:
        json.dump({"tenants": [{"id": "demo-hospital", "key_sha256": key_hash,
                                "max_concurrent": 8, "cases_per_minute": 600}]}, f)
    with open(os.path.join(run, "status.key"), "w") as f:
        f.write(key + "\n")
    os.chmod(os.path.join(run, "status.key"), 0o600)
    cfg = {
        "router_bin": os.path.join(build, "router-node", "medmoe-router"),
        "keygen_bin": os.path.join(build, "router-node", "medmoe-keygen"),  # CurveZMQ keys at `up`
        "expert_bin": os.path.join(build, "expert-node", "medmoe-expert"),
        "model": model, "vision": os.path.join(model, "clip"), "backend": "cpu", "threads": 1,
        "log_dir": os.path.join(run, "logs"), "state_dir": os.path.join(run, "state"),
        "status_key_file": os.path.join(run, "status.key"), "up_timeout_s": 120,
        "router": {"experts_bind": "tcp://127.0.0.1:*", "grpc_listen": "127.0.0.1:0",
                   "tenants": os.path.join(run, "tenants.json"),
                   "audit_log": os.path.join(run, "audit.jsonl"), "args": ["--slots", "8"]},
        "experts": {"replicas": {"default": 1}},
    }
    with open(os.path.join(run, "cluster.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(model, "config.json")) as f:
        names = json.load(f).get("moe", {}).get("expert_names") or []

    subprocess.run(cluster + ["down"], capture_output=True)  # a previous demo left running
    print("== starting the cluster: medmoe-router + one medmoe-expert per expert (%s)" % model)
    subprocess.run(cluster + ["up"], check=True)
    try:
        port = open(os.path.join(run, "state", "grpc.port")).read().strip()
        server = "127.0.0.1:" + port
        print(subprocess.run(cluster + ["status"], capture_output=True, text=True).stdout)
        from medmoe_client import Client
        cases = [json.loads(l) for l in open(os.path.join(cases_dir, "cases.jsonl")) if l.strip()]
        right = 0
        with Client(server, key=key, stub_dir=os.path.join(run, "py-stubs")) as client:
            for i, c in enumerate(cases):
                img_path = os.path.join(cases_dir, c["image"])
                t0 = time.monotonic()
                if i % 2 == 0:  # the Python client
                    via = "python"
                    ans = client.ask(c["question"], image=open(img_path, "rb").read(),
                                     case_id="demo-%d" % i, max_tokens=8)
                    answer, routing = ans.answer, [
                        {"layer": r.layer, "image_tokens_per_expert": list(r.image_tokens_per_expert)}
                        for r in ans.routing]
                else:  # the C CLI
                    via = "C CLI"
                    out = sh(os.path.join(build, "clients", "medmoe"), "ask", "--server", server,
                             "--key", key, "--image", img_path, "--question", c["question"],
                             "--max-tokens", "8", "--case-id", "demo-%d" % i, "--json")
                    d = json.loads(out)
                    answer, routing = d.get("answer", ""), d.get("routing", [])
                ms = (time.monotonic() - t0) * 1000
                ok = c["answer"].lower() in answer.lower()
                right += ok
                served = []
                for r in routing:
                    counts = r.get("image_tokens_per_expert") or r.get("imageTokensPerExpert") or []
                    if counts:
                        e = max(range(len(counts)), key=lambda j: counts[j])
                        served.append("layer %s: expert %d%s" % (
                            r.get("layer", "?"), e, " (%s)" % names[e] if e < len(names) else ""))
                print("[%s] %s — %s\n    answer: %-12s truth: %-10s %s   (%.0f ms, via %s)\n"
                      "    image tokens served by: %s"
                      % (c["modality"], c["image"], c["question"], answer, c["answer"],
                         "correct" if ok else "WRONG", ms, via, "; ".join(served) or "-"))
        print("== %d of %d answers contain the ground truth" % (right, len(cases)))
        dicom_case(build, server, key, run, cases_dir, cases)
        print("== classification through the C CLI:")
        print(sh(os.path.join(build, "clients", "medmoe"), "classify", "--server", server,
                 "--key", key, "--image", os.path.join(cases_dir, cases[0]["image"]),
                 "--question", "What modality is this image?",
                 "--candidates", "ct,mri,x-ray,pathology"))
    finally:
        print("== stopping the cluster")
        subprocess.run(cluster + ["down"])
        print("   logs and the audit log are in %s" % run)


if __name__ == "__main__":
    main()
