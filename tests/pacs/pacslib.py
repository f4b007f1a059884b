#!/usr/bin/python3
"""Harness for the PACS bridge tests and benchmark (docs/PACS.md): a real Orthanc (Debian's
`orthanc` + `orthanc-dicomweb`) on 127.0.0.1, on free ports, with its own configuration and
storage in the work directory; the real medmoe-router + medmoe-expert (tests/grpc/grpclib.py)
on the demo model; medmoe-pacs run as a process.

    with Orthanc(workdir) as pacs, G.GrpcCluster(bins, workdir) as cl:
        pacs.upload(study.files)
        out = run_pull(bins["pacs"], pacs, cl, tenant, ["--study", study.uid, ...])
"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(ROOT, "tests", "grpc"))
sys.path.insert(0, HERE)
import grpclib as G  # noqa: E402

D = G.D
TestFailure = G.TestFailure
log = G.log

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def orthanc_missing():
    """Why Orthanc cannot run here (None when it can)."""
    if not os.access(ORTHANC, os.X_OK):
        return "Orthanc is not installed (Debian package orthanc)"
    if not os.path.exists(DICOMWEB_PLUGIN):
        return "the DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Orthanc:
    """Orthanc with DICOMweb on 127.0.0.1 (HTTP only, no DICOM port, no authentication),
    StableAge 1 s, storage under workdir/orthanc."""

    def __init__(self, workdir, stable_age=1):
        self.workdir = workdir
        self.stable_age = stable_age
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, et, ev, tb):
        if et is not None and self.proc:
            print("---- " + self.proc.describe(), flush=True)
        self.stop()
        return False

    def start(self, attempts=3):
        last = ""
        for _ in range(attempts):  # a free port may be taken between the probe and the bind
            self.port = free_port()
            self.url = "http://127.0.0.1:%d" % self.port
            store = os.path.join(self.workdir, "orthanc")
            os.makedirs(store, exist_ok=True)
            cfg = {"Name": "medmoe-test", "StorageDirectory": store, "IndexDirectory": store,
                   "HttpPort": self.port, "HttpServerEnabled": True, "RemoteAccessAllowed": False,
                   "AuthenticationEnabled": False, "DicomServerEnabled": False,
                   "DicomPort": free_port(), "StableAge": self.stable_age,
                   "Plugins": [DICOMWEB_PLUGIN], "HttpThreadsCount": 4,
                   "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}}
            path = os.path.join(self.workdir, "orthanc.json")
            with open(path, "w") as f:
                json.dump(cfg, f, indent=1)
            self.proc = D.Proc("orthanc", [ORTHANC, path], self.workdir, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.alive():
                try:
                    self.get("/system")
                    self.get("/dicom-web/studies")  # the plugin answers too
                    log("orthanc %s ready (pid %d)" % (self.url, self.proc.pid))
                    return
                except (OSError, urllib.error.URLError):
                    time.sleep(0.05)
            last = self.proc.describe()
            self.proc.kill()
        raise TestFailure("Orthanc did not start in %d attempts\n%s" % (attempts, last))

    def stop(self):
        if self.proc:
            self.proc.signal(signal.SIGTERM)
            if self.proc.wait(10) is None:
                self.proc.kill()

    # -- HTTP ------------------------------------------------------------------------------
    def request(self, path, data=None, headers=None, method=None):
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def get(self, path, headers=None):
        return self.request(path, headers=headers)

    def get_json(self, path):
        body = self.get(path, {"Accept": "application/json"})
        return json.loads(body) if body else []

    def upload(self, files):
        for f in files:
            self.request("/instances", data=f, method="POST")

    def last_change(self):
        return self.get_json("/changes?last")["Last"]

    # -- looking at what the bridge stored --------------------------------------------------
    def srs(self, study_uid):
        """SOP Instance UIDs of the SRs in a study (QIDO-RS)."""
        try:
            r = self.get_json("/dicom-web/studies/%s/instances?Modality=SR" % study_uid)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise
        return [i["00080018"]["Value"][0] for i in r]

    def instance_file(self, sop_uid):
        """The stored Part 10 bytes of an instance (Orthanc's REST API)."""
        found = json.loads(self.request("/tools/lookup", data=sop_uid.encode(), method="POST"))
        ids = [x["ID"] for x in found if x["Type"] == "Instance"]
        if not ids:
            raise TestFailure("Orthanc holds no instance %s" % sop_uid)
        return self.get("/instances/%s/file" % ids[0])


def sr_uid(*parts):
    """The SR UID medmoe-pacs derives (clients/pacs/sr.h mm_sr_uid), computed independently."""
    import hashlib
    d = bytearray(hashlib.sha256(b"".join(p.encode() + b"\0" for p in parts)).digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x80
    d[8] = (d[8] & 0x3F) | 0x80
    return "2.25.%d" % int.from_bytes(d, "big")


def start_router(cl, model, tenant_name="pacs", router_extra=()):
    """Router + the model's 4 experts; returns the tenant."""
    t = cl.tenant(tenant_name)
    cl.start(model, experts=4, router_extra=router_extra)
    return t


def bridge_cmd(bins, pacs, cl, tenant, cmd, extra):
    return [bins["pacs"], cmd, "--orthanc", pacs.url, "--server", cl.target, "--key", tenant.key,
            "--http-timeout-ms", "20000", "--ask-timeout-ms", "60000"] + list(extra)


def run_pull(bins, pacs, cl, tenant, extra, name="pull", want_rc=0, timeout=120):
    """medmoe-pacs pull ...: (parsed stdout JSON or None, the log text)."""
    logp = os.path.join(cl.workdir, "%s.log" % name)
    cmd = bridge_cmd(bins, pacs, cl, tenant, "pull", extra)
    t0 = time.monotonic()
    with open(logp, "wb") as lf:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=lf, timeout=timeout)
    wall = time.monotonic() - t0
    text = open(logp, errors="replace").read()
    if p.returncode != want_rc:
        raise TestFailure("medmoe-pacs pull exited %d (want %d)\n%s\n%s"
                          % (p.returncode, want_rc, p.stdout.decode(errors="replace"), D.tail(logp, 40)))
    out = p.stdout.decode()
    res = json.loads(out) if out.strip() else None
    return res, text + out, wall


def check_no_patient_data(texts, patients, what):
    """No patient name (whole or any component), ID or birth date (as stored or as a date)."""
    for pt in patients:
        needles = [pt["name"], pt["id"], pt["birth"],
                   "%s-%s-%s" % (pt["birth"][:4], pt["birth"][4:6], pt["birth"][6:])]
        needles += [x for x in pt["name"].split("^") if x]
        for text in texts:
            for n in needles:
                if n in text:
                    line = next(l for l in text.splitlines() if n in l)
                    raise TestFailure("%s: patient data %r in a log line: %s" % (what, n, line))
