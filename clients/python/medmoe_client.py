#!/usr/bin/python3
"""Python client of medmoe-router's gRPC front door (proto/medmoe.proto, medmoe.v1.CaseService).

Needs Debian's python3-grpcio and python3-grpc-tools. The stubs are generated from
proto/medmoe.proto and proto/health.proto by grpc_tools.protoc into a directory of your
choice (never committed): load_stubs(DIR) makes them when missing or older than the .proto.

    from medmoe_client import Client
    with Client("127.0.0.1:50051", key=API_KEY, stub_dir="build/py-stubs") as c:
        ans = c.ask("What modality is this image?", image=open("case.png", "rb").read())
        print(ans.answer, list(ans.tokens))
        for chunk in c.ask_stream("Describe the image.", image=png):
            print(chunk.text, end="", flush=True)
        ranked = c.classify("Which modality?", ["ct", "mri", "x-ray"], image=png)
        # DICOM: the bytes of a Part 10 file; a CT preset window and a frame are optional
        ans = c.ask("Any nodule?", image=open("ct.dcm", "rb").read(), media_type="application/dicom",
                    dicom_window="lung", dicom_frame=0)

Command line (same shape as the C `medmoe` CLI; exit 1 with "medmoe: STATUS: message"):
    medmoe_client.py ask|classify|status --server HOST:PORT --key KEY [--image F] --question Q
                     [--candidates a,b,c] [--stream] [--json] [--stubs DIR]
                     [--media-type T] [--window auto|full|lung|mediastinum|bone|brain] [--frame N]
A file whose name ends in .dcm is sent as application/dicom unless --media-type says otherwise.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTOS = ("medmoe.proto", "health.proto")

CASE_SERVICE = "medmoe.v1.CaseService"


def load_stubs(stub_dir=None, proto_dir=PROTO_DIR):
    """Generates (when needed) and imports the stubs; returns (medmoe_pb2, medmoe_pb2_grpc,
    health_pb2, health_pb2_grpc)."""
    if stub_dir is None:
        stub_dir = os.environ.get("MEDMOE_PY_STUBS") or os.path.join(tempfile.gettempdir(),
                                                                     "medmoe-py-stubs-%d" % os.getuid())
    os.makedirs(stub_dir, exist_ok=True)
    newest = max(os.path.getmtime(os.path.join(proto_dir, p)) for p in PROTOS)
    outputs = [os.path.join(stub_dir, n) for n in
               ("medmoe_pb2.py", "medmoe_pb2_grpc.py", "health_pb2.py", "health_pb2_grpc.py")]
    if not all(os.path.exists(o) and os.path.getmtime(o) >= newest for o in outputs):
        from grpc_tools import protoc
        wkt = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        args = ["grpc_tools.protoc", "-I" + proto_dir, "-I" + wkt, "--python_out=" + stub_dir,
                "--grpc_python_out=" + stub_dir] + [os.path.join(proto_dir, p) for p in PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError("grpc_tools.protoc failed on %s" % " ".join(PROTOS))
    if stub_dir not in sys.path:
        sys.path.insert(0, stub_dir)
    return tuple(importlib.import_module(m) for m in
                 ("medmoe_pb2", "medmoe_pb2_grpc", "health_pb2", "health_pb2_grpc"))


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


class Client:
    """One channel to medmoe-router; every call carries `authorization: Bearer <key>`.

    tls: None = plaintext; otherwise a dict with any of ca, cert, key (file paths);
    an empty dict = TLS with the system's roots."""

    def __init__(self, target, key=None, tls=None, stub_dir=None, options=()):
        self.pb, self.rpc, self.hpb, self.hrpc = load_stubs(stub_dir)
        self.key = key
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        opts += list(options)
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=opts)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=read_file(tls["ca"]) if tls.get("ca") else None,
                private_key=read_file(tls["key"]) if tls.get("key") else None,
                certificate_chain=read_file(tls["cert"]) if tls.get("cert") else None)
            self.channel = grpc.secure_channel(target, creds, options=opts)
        self.stub = self.rpc.CaseServiceStub(self.channel)
        self.health_stub = self.hrpc.HealthStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def metadata(self, key=None):
        k = self.key if key is None else key
        return [("authorization", "Bearer " + k)] if k else []

    # -- requests ------------------------------------------------------------------------
    def image_message(self, image, media_type="", dicom_window="", dicom_frame=0):
        """An Image: the encoded bytes; for DICOM, the window preset and the frame (1-based,
        0 = middle) go in Image.dicom (proto/medmoe.proto, DicomOptions)."""
        img = self.pb.Image(data=image, media_type=media_type)
        if dicom_window or dicom_frame:
            img.dicom.CopyFrom(self.pb.DicomOptions(window=dicom_window, frame=dicom_frame))
        return img

    def case_request(self, question, image=None, media_type="", max_tokens=0, temperature=0.0,
                     top_p=0.0, seed=0, case_id="", conv_mode="", dicom_window="", dicom_frame=0):
        req = self.pb.CaseRequest(case_id=case_id, question=question, conv_mode=conv_mode,
                                  options=self.pb.GenerationOptions(max_tokens=max_tokens,
                                                                    temperature=temperature,
                                                                    top_p=top_p, seed=seed))
        if image is not None:
            req.image.CopyFrom(self.image_message(image, media_type, dicom_window, dicom_frame))
        return req

    def classify_request(self, question, candidates, image=None, media_type="", case_id="",
                         conv_mode="", dicom_window="", dicom_frame=0):
        req = self.pb.ClassifyRequest(case_id=case_id, question=question, candidates=list(candidates),
                                      conv_mode=conv_mode)
        if image is not None:
            req.image.CopyFrom(self.image_message(image, media_type, dicom_window, dicom_frame))
        return req

    # -- calls (grpc.RpcError on a non-OK status: .code(), .details()) ---------------------
    def ask(self, question, timeout=None, key=None, **kw):
        return self.stub.Ask(self.case_request(question, **kw), timeout=timeout,
                             metadata=self.metadata(key))

    def ask_stream(self, question, timeout=None, key=None, **kw):
        """The call object: iterate it for AnswerChunks; .cancel() ends it."""
        return self.stub.AskStream(self.case_request(question, **kw), timeout=timeout,
                                   metadata=self.metadata(key))

    def classify(self, question, candidates, timeout=None, key=None, **kw):
        return self.stub.Classify(self.classify_request(question, candidates, **kw), timeout=timeout,
                                  metadata=self.metadata(key))

    def server_info(self, timeout=None, key=None):
        return self.stub.GetServerInfo(self.pb.ServerInfoRequest(), timeout=timeout,
                                       metadata=self.metadata(key))

    def health(self, service="", timeout=None, key=None):
        """The serving status's name: "SERVING", "NOT_SERVING", ..."""
        r = self.health_stub.Check(self.hpb.HealthCheckRequest(service=service), timeout=timeout,
                                   metadata=self.metadata(key))
        return self.hpb.HealthCheckResponse.ServingStatus.Name(r.status)


def to_dict(msg):
    """A message as a dict with the .proto field names and every field present."""
    from google.protobuf.json_format import MessageToDict
    return MessageToDict(msg, preserving_proto_field_name=True, including_default_value_fields=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="medmoe_client.py", description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=("ask", "classify", "status"))
    ap.add_argument("--server", required=True)
    ap.add_argument("--key", default=os.environ.get("MEDMOE_API_KEY"))
    ap.add_argument("--image")
    ap.add_argument("--media-type", default="")
    ap.add_argument("--window", default="", help="DICOM VOI window: auto, full, or a CT preset "
                    "(lung W1500/L-600, mediastinum W350/L50, bone W1800/L400, brain W80/L40)")
    ap.add_argument("--frame", type=int, default=0, help="DICOM multi-frame: 1-based frame (0 = middle)")
    ap.add_argument("--question")
    ap.add_argument("--candidates")
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conv-mode", default="")
    ap.add_argument("--case-id", default="")
    ap.add_argument("--timeout-ms", type=int)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tls-ca")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--stubs", help="where the generated stubs go (default $MEDMOE_PY_STUBS or /tmp)")
    a = ap.parse_args(argv)
    if a.cmd != "status" and not a.question:
        ap.error("--question is required")
    if a.cmd == "classify" and not a.candidates:
        ap.error("--candidates is required")
    tls = None
    if a.tls_ca or a.tls_cert or a.tls_key:
        tls = {"ca": a.tls_ca, "cert": a.tls_cert, "key": a.tls_key}
    timeout = a.timeout_ms / 1000.0 if a.timeout_ms else None
    image = read_file(a.image) if a.image else None
    media_type = a.media_type
    if not media_type and a.image and a.image.lower().endswith(".dcm"):
        media_type = "application/dicom"
    dicom = dict(dicom_window=a.window, dicom_frame=a.frame)
    try:
        with Client(a.server, key=a.key, tls=tls, stub_dir=a.stubs) as c:
            if a.cmd == "ask":
                kw = dict(image=image, media_type=media_type, max_tokens=a.max_tokens,
                          temperature=a.temperature, top_p=a.top_p, seed=a.seed, case_id=a.case_id,
                          conv_mode=a.conv_mode, **dicom)
                if a.stream:
                    final = None
                    for ch in c.ask_stream(a.question, timeout=timeout, **kw):
                        if not a.json and ch.text:
                            sys.stdout.write(ch.text)
                            sys.stdout.flush()
                        if ch.HasField("final"):
                            final = ch.final
                    if a.json:
                        print(json.dumps(to_dict(final), indent=1))
                    else:
                        print()
                else:
                    ans = c.ask(a.question, timeout=timeout, **kw)
                    print(json.dumps(to_dict(ans), indent=1) if a.json else ans.answer)
            elif a.cmd == "classify":
                r = c.classify(a.question, a.candidates.split(","), timeout=timeout, image=image,
                               media_type=media_type, case_id=a.case_id, conv_mode=a.conv_mode,
                               **dicom)
                if a.json:
                    print(json.dumps(to_dict(r), indent=1))
                else:
                    for x in r.candidates:
                        print("%-24s p=%.4f  logprob=%.4f" % (x.text, x.prob, x.logprob))
            else:
                info = c.server_info(timeout=timeout)
                h = c.health("", timeout=timeout)
                hs = c.health(CASE_SERVICE, timeout=timeout)
                if a.json:
                    print(json.dumps({"server_info": to_dict(info), "health": h, "health_case_service": hs},
                                     indent=1))
                else:
                    print("version:  %s\nmodel:    %s\nbackbone: %s\nbackend:  %s\nhealth:   %s (%s)"
                          % (info.version, info.model, info.backbone, info.backend, h, hs))
                    for e in info.experts:
                        print("expert %d %s: %d live replicas" % (e.expert, e.name, e.live_replicas))
    except grpc.RpcError as e:
        print("medmoe: %s: %s" % (e.code().name, e.details()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
