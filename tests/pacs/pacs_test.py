#!/usr/bin/python3
"""medmoe-pacs against a real Orthanc and the real router (docs/PACS.md). One scenario per
ctest:

  pull   a study with a CT scout, a 5-image CT series and a 7-image MR series: pull --modality
         CT chooses the middle instance of the 5-image series, the answer equals a direct gRPC
         ask of the same image, the SR is stored in the same study, parses with pydicom and
         DCMTK's dsrdump, references study/series/instance, names the model fingerprint
         (GetServerInfo) and the experts of the answer's routing, says machine-generated; a
         second pull finds it and does not ask again; a rule picks the MR series; bad UIDs
         and unknown studies fail with a clear message.
  watch  5 studies (CT/MR, 5 patients) and one of no rule's modality arrive; the bridge is
         killed (SIGKILL) once the first SR appears and restarted: 5 SRs, one per study, none
         for the unmatched study, no study stored twice; then the state file is lost and the
         bridge re-reads the whole feed: it finds every SR, asks nothing, stores nothing;
         a second bridge on the same state is refused; SIGTERM stops it cleanly (exit 0);
         --once drains the feed and exits 0.
  hostile  a fake PACS (fakepacs.py) that breaks one step per study: metadata not JSON or not
         an array, no SOP class, WADO-RS HTTP 500, a broken multipart (or PNG), STOW-RS
         refusing the SR: exit 1 with a line naming the step each time; the good study works;
         SIGTERM while the Ask is in flight (the router delays each image 2 s) ends the pull
         within 1 s, storing nothing.
All: no patient name, ID or birth date in any bridge (or router) log line.
Skips (exit 77) only when Orthanc or its DICOMweb plugin is not installed.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True
import pacslib as P  # noqa: E402
import dicomgen  # noqa: E402

D = P.D
TestFailure = P.TestFailure
log = P.log
CASES = dicomgen.CASES


def wait_for(what, fn, timeout, procs=()):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        for p in procs:
            if not p.alive():
                raise TestFailure("%s exited (status %s) while waiting for %s\n%s"
                                  % (p.name, p.p.returncode, what, p.describe()))
        time.sleep(0.1)
    raise TestFailure("timed out after %d s waiting for %s" % (timeout, what))


def sent_image(pacs, send, study, series, sop):
    """The bytes the bridge sends for an instance, fetched independently of it."""
    if send == "rendered":
        return pacs.get("/dicom-web/studies/%s/series/%s/instances/%s/rendered" % (study, series, sop),
                        {"Accept": "image/png"}), "image/png"
    return pacs.instance_file(sop), "application/dicom"


def content(ds):
    """{concept meaning: item} of the SR's top-level content items."""
    out = {}
    for it in ds.ContentSequence:
        out[it.ConceptNameCodeSequence[0].CodeMeaning] = it
    return out


def check_sr(pacs, sr_uid, study, series, sop, sop_class, answer, fingerprint, experts, question,
             patient, workdir):
    import pydicom
    data = pacs.instance_file(sr_uid)
    path = os.path.join(workdir, "sr-%s.dcm" % sr_uid[-12:])
    with open(path, "wb") as f:
        f.write(data)
    ds = pydicom.dcmread(path)
    want = {"SOPClassUID": P.BASIC_TEXT_SR, "SOPInstanceUID": sr_uid, "StudyInstanceUID": study,
            "Modality": "SR", "VerificationFlag": "UNVERIFIED", "CompletionFlag": "COMPLETE",
            "ValueType": "CONTAINER", "PatientName": patient["name"], "PatientID": patient["id"],
            "PatientBirthDate": patient["birth"]}
    for k, v in want.items():
        if str(ds.get(k, "")) != v:
            raise TestFailure("SR %s: %s is %r, want %r" % (sr_uid, k, str(ds.get(k, "")), v))
    if ds.SeriesInstanceUID == series:
        raise TestFailure("SR %s: stored in the source series, want a series of its own" % sr_uid)
    ev = ds.CurrentRequestedProcedureEvidenceSequence[0]
    rs = ev.ReferencedSeriesSequence[0]
    ref = rs.ReferencedSOPSequence[0]
    got = (ev.StudyInstanceUID, rs.SeriesInstanceUID, ref.ReferencedSOPClassUID,
           ref.ReferencedSOPInstanceUID)
    if got != (study, series, sop_class, sop):
        raise TestFailure("SR %s: evidence references %s, want %s"
                          % (sr_uid, got, (study, series, sop_class, sop)))
    c = content(ds)
    finding = c.get("Finding")
    if finding is None or finding.TextValue != answer:
        raise TestFailure("SR %s: Finding %r, want the answer %r"
                          % (sr_uid, finding.TextValue if finding else None, answer))
    img = finding.ContentSequence[0]
    if (img.RelationshipType, img.ValueType, img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) != \
            ("INFERRED FROM", "IMAGE", sop):
        raise TestFailure("SR %s: the Finding is not INFERRED FROM an IMAGE item naming %s" % (sr_uid, sop))
    checks = [("Algorithm Version", fingerprint), ("Algorithm Parameters", experts),
              ("Question", question), ("Device Observer Name", "medmoe-pacs")]
    for meaning, v in checks:
        if meaning not in c or c[meaning].TextValue != v:
            raise TestFailure("SR %s: %s is %r, want %r"
                              % (sr_uid, meaning, c[meaning].TextValue if meaning in c else None, v))
    if c["Observer Type"].ConceptCodeSequence[0].CodeValue != "121007":
        raise TestFailure("SR %s: Observer Type is not Device (121007)" % sr_uid)
    if "Machine-generated" not in c["Comment"].TextValue or fingerprint not in c["Comment"].TextValue:
        raise TestFailure("SR %s: the Comment does not say machine-generated by %s: %r"
                          % (sr_uid, fingerprint, c["Comment"].TextValue))
    # DCMTK: dsrdump parses and checks the document against the Basic Text SR IOD.
    p = subprocess.run(["dsrdump", "+Pl", "+Pu", "+Pc", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=30)
    out, errtext = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    if p.returncode != 0 or re.search(r"^(E|W):", errtext, re.M):
        raise TestFailure("dsrdump %s: exit %d\n%s%s" % (path, p.returncode, errtext, out))
    for s in (answer, sop, "Basic Text SR", "UNVERIFIED"):
        if s not in out:
            raise TestFailure("dsrdump %s: %r not in its output\n%s" % (path, s, out))
    log("SR %s: pydicom and dsrdump agree: answer %r, references %s" % (sr_uid, answer, sop))
    return ds


def expert_text(routing, names):
    """What the bridge writes for a CaseAnswer's routing (pacs.c s_experts_text)."""
    sums = {}
    for r in routing:
        for e, n in enumerate(r.image_tokens_per_expert):
            sums[e] = sums.get(e, 0) + n
    parts = ["expert %d%s: %d image tokens" % (e, " (%s)" % names[e] if names.get(e) else "", n)
             for e, n in sorted(sums.items()) if n]
    if not parts:
        return "no image routing (over %d MoE layers)" % len(routing)
    return "; ".join(parts) + " (over %d MoE layers)" % len(routing)


def server_info(client):
    si = client.server_info(timeout=10)
    if len(si.model_fingerprint) != 64:
        raise TestFailure("GetServerInfo: model_fingerprint %r is not 64 hex digits" % si.model_fingerprint)
    return si, {e.expert: e.name for e in si.experts}


# -- pull --------------------------------------------------------------------------------------
def scenario_pull(a, bins):
    pt = dicomgen.PATIENTS[0]
    study = dicomgen.make_study([("CT", "ct_1.png", 1), ("CT", "ct_1.png", 5), ("MR", "mri_1.png", 7)], pt)
    with P.Orthanc(a.workdir) as pacs, P.G.GrpcCluster(bins, a.workdir) as cl:
        t = P.start_router(cl, a.model)
        pacs.upload(study.files)
        client = cl.client(t)
        si, names = server_info(client)
        q = "What modality is this image?"
        se, sop = study.middle_of_largest("CT")
        send = ["--send", a.send]
        res, text1, _ = P.run_pull(bins, pacs, cl, t, ["--study", study.uid, "--modality", "CT",
                                                       "--question", q, "--max-tokens", "8"] + send)
        if (res["status"], res["series"], res["instance"]) != ("answered", se, sop):
            raise TestFailure("pull chose %s/%s (%s), want the middle instance %s of the 5-image CT "
                              "series %s" % (res["series"], res["instance"], res["status"], sop, se))
        want_uid = P.sr_uid("medmoe-pacs-sr-v1", study.uid, se, sop, q)
        if res["sr_instance"] != want_uid:
            raise TestFailure("SR UID %s, want %s (derived from study, series, instance, question)"
                              % (res["sr_instance"], want_uid))
        # The same image asked directly: the same answer and routing.
        img, mt = sent_image(pacs, a.send, study.uid, se, sop)
        direct = client.ask(q, image=img, media_type=mt, max_tokens=8, timeout=60)
        png = client.ask(q, image=open(os.path.join(CASES, "ct_1.png"), "rb").read(), max_tokens=8,
                         timeout=60)
        if res["answer"] != direct.answer or list(direct.tokens) != list(png.tokens):
            raise TestFailure("pull answered %r; a direct ask of the same %s answers %r, of ct_1.png %r"
                              % (res["answer"], mt, direct.answer, png.answer))
        experts = expert_text(direct.routing, names)
        if res["experts"] != experts or res["model_fingerprint"] != si.model_fingerprint:
            raise TestFailure("pull reports experts %r, fingerprint %s; the router: %r, %s"
                              % (res["experts"], res["model_fingerprint"], experts, si.model_fingerprint))
        srs = pacs.srs(study.uid)
        if srs != [res["sr_instance"]]:
            raise TestFailure("study %s holds SRs %s, want exactly [%s]" % (study.uid, srs, res["sr_instance"]))
        check_sr(pacs, res["sr_instance"], study.uid, se, sop, dicomgen.SOP_CLASS["CT"], direct.answer,
                 si.model_fingerprint, experts, q, pt, a.workdir)
        log("pull: answered %r in %.0f ms (ask %.0f ms), SR %s"
            % (res["answer"], res["total_ms"], res["ask_ms"], res["sr_instance"]))

        # Again: the SR is found, nothing is asked or stored.
        res2, text2, _ = P.run_pull(bins, pacs, cl, t, ["--study", study.uid, "--modality", "CT",
                                                        "--question", q, "--max-tokens", "8"] + send,
                                    name="pull-again")
        if res2["status"] != "exists" or res2["sr_instance"] != res["sr_instance"] or "answer" in res2:
            raise TestFailure("second pull: %s, want status exists for SR %s" % (res2, res["sr_instance"]))
        if "already in the PACS" not in text2 or "answered in" in text2:
            raise TestFailure("second pull asked again:\n%s" % text2)

        # A rule: the first whose modality the study has (XA: none; MR: the 7-image series).
        rules = os.path.join(a.workdir, "rules.json")
        with open(rules, "w") as f:
            json.dump({"rules": [{"modality": "XA", "question": "unused"},
                                 {"modality": "MR", "question": "Is any abnormality visible?",
                                  "max_tokens": 4}]}, f)
        res3, text3, _ = P.run_pull(bins, pacs, cl, t, ["--study", study.uid, "--rules", rules] + send,
                                    name="pull-rule")
        se3, sop3 = study.middle_of_largest("MR")
        if (res3["status"], res3["series"], res3["instance"]) != ("answered", se3, sop3):
            raise TestFailure("pull --rules chose %s/%s, want the MR series' middle %s/%s"
                              % (res3["series"], res3["instance"], se3, sop3))
        if sorted(pacs.srs(study.uid)) != sorted([res["sr_instance"], res3["sr_instance"]]):
            raise TestFailure("study holds SRs %s after a second question" % pacs.srs(study.uid))

        # Errors: a clear line, exit 1.
        texts = [text1, text2, text3]
        for args, want in ((["--study", "1.2.3.4.5.6.7"], "not in the PACS"),
                           (["--study", "1.2.abc"], "is not a DICOM UID"),
                           (["--study", study.uid, "--modality", "US"], "no image instance of modality US"),
                           (["--study", study.uid, "--rules", os.path.join(a.workdir, "nope.json")],
                            "nope.json")):
            extra = args + ([] if "--rules" in args else ["--question", q])
            _, text, _ = P.run_pull(bins, pacs, cl, t, extra, name="pull-bad", want_rc=1 if "--rules" not in args else 1)
            if want not in text:
                raise TestFailure("pull %s: the log does not say %r:\n%s" % (" ".join(args), want, text))
            texts.append(text)
        P.check_no_patient_data(texts + [cl.router.log_text()], [pt], "pull")


# -- watch -------------------------------------------------------------------------------------
def stored_lines(texts):
    n = {}
    for t in texts:
        for m in re.finditer(r"study (\S+): answered in .* SR (\S+) stored", t):
            n[m.group(1)] = n.get(m.group(1), 0) + 1
    return n


def read_state(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def scenario_watch(a, bins):
    specs = [[("CT", "ct_1.png", 3)], [("MR", "mri_1.png", 3)], [("CT", "ct_2.png", 1), ("CT", "ct_1.png", 4)],
             [("MR", "mri_2.png", 2)], [("CT", "ct_2.png", 3), ("MR", "mri_1.png", 2)]]
    studies = [dicomgen.make_study(s, dicomgen.PATIENTS[i]) for i, s in enumerate(specs)]
    unmatched = dicomgen.make_study([("SM", "pathology_1.png", 2)], dicomgen.PATIENTS[0])
    rules = os.path.join(a.workdir, "rules.json")
    with open(rules, "w") as f:
        json.dump({"rules": [{"modality": "CT", "question": "What modality is this image?", "max_tokens": 8},
                             {"modality": "MR", "question": "Is any abnormality visible?", "max_tokens": 4}]}, f)
    state = os.path.join(a.workdir, "state.json")
    for p in (state, state + ".lock"):
        if os.path.exists(p):
            os.remove(p)
    with P.Orthanc(a.workdir) as pacs, P.G.GrpcCluster(bins, a.workdir) as cl:
        t = P.start_router(cl, a.model)
        runs = []

        def start(name):
            cmd = P.bridge_cmd(bins, pacs, cl, t, "watch", ["--rules", rules, "--state", state,
                                                            "--poll-ms", "100", "--send", a.send]
                               + (["--once"] if name == "watch-once" else []))
            pr = D.Proc(name, cmd, a.workdir, stdin=subprocess.DEVNULL)
            cl.procs.append(pr)
            runs.append(pr)
            return pr

        b1 = start("watch-1")
        pacs.upload([f for s in studies[:3] for f in s.files])
        wait_for("the first SR", lambda: any(pacs.srs(s.uid) for s in studies[:3]), 90, [b1])
        b1.kill()  # SIGKILL, mid-way: the other studies are queued or being answered
        done1 = [s.uid for s in studies if pacs.srs(s.uid)]
        log("watch-1 killed (SIGKILL) with %d of 5 SRs stored" % len(done1))
        pacs.upload([f for s in studies[3:] for f in s.files] + unmatched.files)
        b2 = start("watch-2")
        wait_for("5 SRs", lambda: all(pacs.srs(s.uid) for s in studies), 120, [b2])

        # Every study's SR made it change, then stable again: wait until Orthanc says each is
        # stable (so that StableStudy is in the feed) and the bridge has read the whole feed.
        wait_for("the bridge to read past the SRs' own StableStudy",
                 lambda: caught_up(pacs, studies, state), 60, [b2])
        if "watching the change feed from change 0 " in b2.log_text():
            raise TestFailure("watch-2 started from change 0: the state of watch-1 was not kept\n"
                              + b2.describe())
        check_watch_result(pacs, studies, unmatched, state, runs, first=True)

        # A second bridge on the same state is refused.
        b_dup = start("watch-dup")
        rc = b_dup.wait(30)
        if rc != 1 or "another medmoe-pacs holds" not in b_dup.log_text():
            raise TestFailure("a second bridge on the same state: exit %s\n%s" % (rc, b_dup.describe()))

        # SIGTERM: a clean stop.
        stop_clean(b2)

        # The state file lost: the whole feed again, every SR found, nothing asked or stored.
        os.remove(state)
        b3 = start("watch-3")
        wait_for("watch-3 to read the whole feed", lambda: caught_up(pacs, studies, state), 90, [b3])
        t3 = b3.log_text()
        if stored_lines([t3]) or t3.count("already in the PACS") < 5:
            raise TestFailure("watch-3 (state lost) stored %s, found %d SRs; want nothing stored, 5 found\n%s"
                              % (stored_lines([t3]), t3.count("already in the PACS"), t3))
        stop_clean(b3)
        # --once (cron): reads the rest of the feed, finds nothing to do, exits 0.
        b4 = start("watch-once")
        rc = b4.wait(60)
        if rc != 0 or stored_lines([b4.log_text()]) or "state saved" not in b4.log_text():
            raise TestFailure("watch --once: exit %s\n%s" % (rc, b4.describe()))
        check_watch_result(pacs, studies, unmatched, state, runs, first=False)
        P.check_no_patient_data([r.log_text() for r in runs] + [cl.router.log_text()],
                                dicomgen.PATIENTS, "watch")


def caught_up(pacs, studies, state):
    st = read_state(state)
    if not st or len(st["studies"]) != 5 or st["since"] < pacs.last_change():
        return False
    for s in studies:
        found = json.loads(pacs.request("/tools/lookup", data=s.uid.encode(), method="POST"))
        sid = [x["ID"] for x in found if x["Type"] == "Study"][0]
        if not pacs.get_json("/studies/%s" % sid).get("IsStable"):
            return False
    return read_state(state)["since"] >= pacs.last_change()


def stop_clean(pr):
    pr.signal(signal.SIGTERM)
    rc = pr.wait(20)
    if rc != 0 or "state saved" not in pr.log_text():
        raise TestFailure("%s: exit %s after SIGTERM (want 0 and 'state saved')\n%s"
                          % (pr.name, rc, pr.describe()))
    log("%s stopped cleanly on SIGTERM" % pr.name)


def check_watch_result(pacs, studies, unmatched, state, runs, first):
    st = read_state(state)
    for s in studies:
        srs = pacs.srs(s.uid)
        if len(srs) != 1:
            raise TestFailure("study %s holds %d SRs %s, want exactly 1" % (s.uid, len(srs), srs))
        entry = st["studies"].get(s.uid)
        if not entry or entry.get("sr") != srs[0] or entry["status"] not in ("answered", "exists"):
            raise TestFailure("state for study %s is %s, want the SR %s" % (s.uid, entry, srs[0]))
        import pydicom
        import io
        ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(srs[0])))
        mod = "CT" if any(m == "CT" for _, _, _, _, m in s.instances) else "MR"
        se, sop = s.middle_of_largest(mod)
        ref = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        if (ref.SeriesInstanceUID, ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) != (se, sop):
            raise TestFailure("study %s: the SR answers for %s/%s, want %s/%s (rule %s)"
                              % (s.uid, ref.SeriesInstanceUID,
                                 ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID, se, sop, mod))
    if pacs.srs(unmatched.uid):
        raise TestFailure("the SM study (no rule) got an SR")
    if unmatched.uid in st["studies"]:
        raise TestFailure("the SM study (no rule) is in the state: %s" % st["studies"][unmatched.uid])
    n = stored_lines([r.log_text() for r in runs])
    twice = {k: v for k, v in n.items() if v > 1}
    if twice:
        raise TestFailure("SRs stored more than once: %s" % twice)
    log("watch: 5 studies, 5 SRs, none stored twice (stored lines %d)%s"
        % (sum(n.values()), "" if first else " after losing the state"))


# -- hostile ------------------------------------------------------------------------------------
def scenario_hostile(a, bins):
    """A PACS that answers wrongly (tests/pacs/fakepacs.py): each broken step ends the pull with
    exit 1 and a line naming it; nothing crashes (run under ASan too); the good study works."""
    import fakepacs
    fake = fakepacs.FakePacs()
    try:
        with P.G.GrpcCluster(bins, a.workdir) as cl:
            # Each image takes 2 s more in the router: long enough to stop a pull mid-Ask.
            t = P.start_router(cl, a.model, router_extra=["--debug-vision-delay-ms", "2000"])
            check_sigterm_mid_ask(bins, fake, cl, t, a)
            want = {"1.2.9.1": "reply is not JSON", "1.2.9.2": "lacks valid series, SOP class",
                    "1.2.9.3": "HTTP 500: disk on fire", "1.2.9.5": "refused it (reason A700)",
                    "1.2.9.7": "not a JSON array",
                    "1.2.9.4": "reply is not a PNG" if a.send == "rendered" else "multipart part not closed"}
            texts = []
            for study, msg in sorted(want.items()):
                _, text, _ = P.run_pull(bins, fake, cl, t, ["--study", study, "--question", "Q?",
                                                            "--send", a.send, "--max-tokens", "2"],
                                        name="pull-%s" % study, want_rc=1)
                if msg not in text:
                    raise TestFailure("study %s (%s): the log does not say %r:\n%s"
                                      % (study, fakepacs.BROKEN[study], msg, text))
                log("%s: %s" % (fakepacs.BROKEN[study], text.strip().splitlines()[-1][-110:]))
                texts.append(text)
            res, text, _ = P.run_pull(bins, fake, cl, t, ["--study", "1.2.9.6", "--question", "Q?",
                                                          "--send", a.send, "--max-tokens", "2"],
                                      name="pull-good")
            stored = [b for s, b in fake.stored if s == "1.2.9.6"]
            if res["status"] != "answered" or len(stored) != 1 or b"DICM" not in stored[0]:
                raise TestFailure("the good study: %s, %d STOW-RS bodies" % (res, len(stored)))
            P.check_no_patient_data(texts + [text], dicomgen.PATIENTS[:1], "hostile")
    finally:
        fake.close()


def check_sigterm_mid_ask(bins, fake, cl, t, a):
    """SIGTERM while the Ask is in flight (the router holds each image 2 s): the pull ends
    within 1 s, says it abandoned the Ask, stores nothing."""
    cmd = P.bridge_cmd(bins, fake, cl, t, "pull", ["--study", "1.2.9.6", "--question", "Q?",
                                                   "--send", a.send, "--max-tokens", "2"])
    pr = D.Proc("pull-sigterm", cmd, a.workdir, stdin=subprocess.DEVNULL)
    cl.procs.append(pr)
    wait_for("the pull to ask", lambda: "chose instance" in pr.log_text()
             and "GetServerInfo" in cl.router.log_text(), 30, [pr])
    t0 = time.monotonic()
    pr.signal(signal.SIGTERM)
    rc = pr.wait(10)
    took = time.monotonic() - t0
    if rc != 1 or took > 1.0 or "Ask: abandoned (stopping)" not in pr.log_text() or fake.stored:
        raise TestFailure("SIGTERM mid-Ask: exit %s after %.2f s, %d STOW-RS (want 1 within 1 s, "
                          "'Ask: abandoned', none)\n%s" % (rc, took, len(fake.stored), pr.describe()))
    log("SIGTERM mid-Ask: the pull stopped in %.2f s" % took)


SCENARIOS = {"pull": scenario_pull, "watch": scenario_watch, "hostile": scenario_hostile}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--pacs", required=True)
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--send", default="dicom", choices=["dicom", "rendered"])
    a = ap.parse_args()
    why = P.orthanc_missing()
    if why:
        print("SKIP: " + why, flush=True)
        sys.exit(77)
    D.fresh_dir(a.workdir)
    bins = {"pacs": a.pacs, "router": a.router, "expert": a.expert}
    D.main_wrapper(lambda: SCENARIOS[a.scenario](a, bins))


if __name__ == "__main__":
    main()
