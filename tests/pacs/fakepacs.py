#!/usr/bin/python3
"""A PACS that answers wrongly, for the bridge's error paths (pacs_test.py --scenario hostile).

A DICOMweb server on 127.0.0.1 (ephemeral port, a thread) that serves one good CT instance
(dicomgen) under every study UID and breaks one step per study UID:

    1.2.9.1  metadata is not JSON            1.2.9.4  WADO-RS: an unclosed multipart / not a PNG
    1.2.9.2  metadata lacks the SOP class    1.2.9.5  STOW-RS: Failed SOP Sequence, reason A700
    1.2.9.3  WADO-RS answers HTTP 500        1.2.9.6  nothing broken (the fake itself is right)
    1.2.9.7  metadata is a JSON object, not an array
"""

import http.server
import json
import threading

import dicomgen

BROKEN = {"1.2.9.1": "metadata not JSON", "1.2.9.2": "no SOP class", "1.2.9.3": "WADO 500",
          "1.2.9.4": "bad multipart", "1.2.9.5": "STOW refused", "1.2.9.6": "good",
          "1.2.9.7": "metadata object"}


class FakePacs:
    def __init__(self):
        self.dcm, self.sop = dicomgen.make_instance("1.2.9", "1.2.9.100", 1, 1, "CT", "ct_1.png",
                                                    dicomgen.PATIENTS[0])
        import io
        import PIL.Image
        buf = io.BytesIO()
        PIL.Image.open(dicomgen.os.path.join(dicomgen.CASES, "ct_1.png")).convert("L").save(buf, "PNG")
        self.png = buf.getvalue()
        self.stored = []
        fake = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code, body, ctype="application/dicom+json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                study = parts[2] if len(parts) > 2 else ""
                mode = BROKEN.get(study, "good")
                if parts[-1] == "metadata":
                    if mode == "metadata not JSON":
                        return self.reply(200, b"<html>not json</html>")
                    if mode == "metadata object":
                        return self.reply(200, b'{"Message": "an object"}')
                    m = fake.metadata(study, mode)
                    return self.reply(200, json.dumps([m]).encode())
                if parts[-1] == "instances":  # QIDO-RS: no SR yet
                    return self.reply(200, b"[]")
                if mode == "WADO 500":
                    return self.reply(500, b'{"Message": "disk on fire"}', "application/json")
                if parts[-1] == "rendered":
                    return self.reply(200, b"GIF89a" if mode == "bad multipart" else fake.png, "image/png")
                b = "fakeboundary"
                body = (b"--" + b.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + fake.dcm
                        + (b"" if mode == "bad multipart" else b"\r\n--" + b.encode() + b"--\r\n"))
                return self.reply(200, body, 'multipart/related; type="application/dicom"; boundary=' + b)

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                study = self.path.strip("/").split("/")[2]
                fake.stored.append((study, body))
                if BROKEN.get(study) == "STOW refused":
                    r = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [42752]}}]}}
                else:
                    r = {"00081199": {"vr": "SQ", "Value": [{}]}}
                return self.reply(200, json.dumps(r).encode())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def metadata(self, study, mode):
        m = {"0020000D": {"vr": "UI", "Value": [study]}, "0020000E": {"vr": "UI", "Value": ["1.2.9.100"]},
             "00080018": {"vr": "UI", "Value": [self.sop]}, "00080060": {"vr": "CS", "Value": ["CT"]},
             "00280010": {"vr": "US", "Value": [64]}, "00200013": {"vr": "IS", "Value": [1]},
             "00100010": {"vr": "PN", "Value": [{"Alphabetic": dicomgen.PATIENTS[0]["name"]}]}}
        if mode != "no SOP class":
            m["00080016"] = {"vr": "UI", "Value": [dicomgen.SOP_CLASS["CT"]]}
        return m

    def close(self):
        self.server.shutdown()
        self.server.server_close()
