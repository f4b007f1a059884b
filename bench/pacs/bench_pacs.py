#!/usr/bin/python3
"""Benchmark of the PACS bridge (docs/PACS.md): the end-to-end time of `medmoe-pacs pull`
per study (metadata, choice, WADO-RS retrieve, GetServerInfo, Ask, SR build, STOW-RS),
beside a direct gRPC ask of the same image bytes by the C CLI `medmoe ask` (a process too,
so process start-up is on both sides) and by the Python client (in process), all in the same
run against the same router (demo model, 4 experts) and a real Orthanc on 127.0.0.1.
Each study gets a new question so that every pull really asks (an existing SR would be
found and the ask skipped). Prints; never fails (exit 0 with a message when it cannot run).

    bench_pacs.py --pacs B/clients/medmoe-pacs --cli B/clients/medmoe --router ... --expert ...
                  --model demo/model --workdir B/bench-pacs [--studies 8] [--send dicom]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(ROOT, "tests", "pacs"))
import pacslib as P  # noqa: E402
import dicomgen  # noqa: E402


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def run(a):
    why = P.orthanc_missing()
    if why:
        print("bench_pacs: skipped: " + why)
        return
    P.D.fresh_dir(a.workdir)
    bins = {"pacs": a.pacs, "router": a.router, "expert": a.expert}
    studies = [dicomgen.make_study([("CT", "ct_1.png", 5)], dicomgen.PATIENTS[i % 5])
               for i in range(a.studies)]
    rows = {"pull_wall": [], "pull_total": [], "pull_ask": [], "cli_wall": [], "py_ask": []}
    with P.Orthanc(a.workdir) as pacs, P.G.GrpcCluster(bins, a.workdir) as cl:
        t = P.start_router(cl, a.model)
        client = cl.client(t)
        for s in studies:
            pacs.upload(s.files)
        # Warm-up: the first ask pays one-time costs on the router (not what is measured).
        se, sop = studies[0].middle_of_largest()
        img = pacs.instance_file(sop) if a.send == "dicom" else pacs.get(
            "/dicom-web/studies/%s/series/%s/instances/%s/rendered" % (studies[0].uid, se, sop),
            {"Accept": "image/png"})
        mt = "application/dicom" if a.send == "dicom" else "image/png"
        client.ask("warm-up", image=img, media_type=mt, max_tokens=a.max_tokens, timeout=60)
        for i, s in enumerate(studies):
            q = "What modality is this image? (%d)" % i
            res, _, wall = P.run_pull(bins, pacs, cl, t, ["--study", s.uid, "--question", q,
                                                          "--max-tokens", str(a.max_tokens),
                                                          "--send", a.send], name="pull-%d" % i)
            rows["pull_wall"].append(wall * 1000)
            rows["pull_total"].append(res["total_ms"])
            rows["pull_ask"].append(res["ask_ms"])
            se, sop = s.middle_of_largest()
            img = pacs.instance_file(sop) if a.send == "dicom" else pacs.get(
                "/dicom-web/studies/%s/series/%s/instances/%s/rendered" % (s.uid, se, sop),
                {"Accept": "image/png"})
            path = os.path.join(a.workdir, "image-%d" % i)
            with open(path, "wb") as f:
                f.write(img)
            t0 = time.monotonic()
            subprocess.run([a.cli, "ask", "--server", cl.target, "--key", t.key, "--image", path,
                            "--media-type", mt, "--question", q, "--max-tokens", str(a.max_tokens)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
            rows["cli_wall"].append((time.monotonic() - t0) * 1000)
            t0 = time.monotonic()
            client.ask(q, image=img, media_type=mt, max_tokens=a.max_tokens, timeout=60)
            rows["py_ask"].append((time.monotonic() - t0) * 1000)
    load = open("/proc/loadavg").read().split()[:3]
    print("bench_pacs: %d studies (CT, 5 x 64x64 8-bit instances each), image sent as %s, "
          "max_tokens %d, demo model, router + 4 experts + Orthanc 1.10 on 127.0.0.1; load %s"
          % (a.studies, mt, a.max_tokens, " ".join(load)))
    print("  %-52s %10s %10s %10s" % ("per study (ms)", "median", "min", "max"))
    labels = [("pull_wall", "medmoe-pacs pull, process wall time"),
              ("pull_total", "  of which the pull itself (in process)"),
              ("pull_ask", "    of which the gRPC Ask"),
              ("cli_wall", "direct: medmoe ask (C CLI), process wall time"),
              ("py_ask", "direct: Python client Ask (in process)")]
    for k, label in labels:
        xs = rows[k]
        print("  %-52s %10.1f %10.1f %10.1f" % (label, med(xs), min(xs), max(xs)))
    print("  bridge overhead per study (pull wall - CLI wall, medians): %.1f ms"
          % (med(rows["pull_wall"]) - med(rows["cli_wall"])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pacs", required=True)
    ap.add_argument("--cli", required=True)
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--send", default="dicom", choices=["dicom", "rendered"])
    a = ap.parse_args()
    try:
        run(a)
    except Exception as e:  # a benchmark prints, never fails
        print("bench_pacs: could not run: %s: %s" % (type(e).__name__, e))


if __name__ == "__main__":
    main()
