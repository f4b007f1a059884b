#!/usr/bin/python3
"""Offline validation of orchestration/kubernetes, orchestration/Dockerfile and
orchestration/cluster.example.json (no cluster here, and `kubectl apply --dry-run=client`
needs an API server even with --validate=false, so):

  1. `kubectl kustomize` renders the set (YAML, kustomization, every resource file present);
     without kubectl the resource files are loaded directly with PyYAML;
  2. a structural check of every object: apiVersion/kind/name, label selectors match pod
     labels, Service ports target named container ports, probes hit declared ports, every
     volume's ConfigMap/Secret exists and holds each file the args name, HPAs target existing
     Deployments with the matching expert label, experts 0..N-1 each once, pointing at the
     router Service's experts port, pods run as non-root;
  3. every flag the manifests pass to medmoe-router / medmoe-expert is in that program's
     --help (known assumptions about programs not written yet are listed and reported);
  4. the Dockerfile (Debian 12 base, cmake build, non-root USER) and the example config
     (only keys medmoe-cluster knows).
"""

import argparse
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
ORCH = os.path.join(ROOT, "orchestration")
K8S = os.path.join(ORCH, "kubernetes")
K8S_GPU = os.path.join(ORCH, "kubernetes-gpu")  # overlay: Vulkan backend, one nvidia.com/gpu per pod

# Flags the manifests use before the program has them (each is reported, not failed).
ASSUMED_FLAGS = {}  # none left: medmoe-router --metrics-listen exists (common/metrics.c)

API = {"Deployment": "apps/v1", "Service": "v1", "ConfigMap": "v1", "Secret": "v1", "Namespace": "v1",
       "HorizontalPodAutoscaler": "autoscaling/v2", "Job": "batch/v1"}

errors = []
notes = []


def err(msg):
    errors.append(msg)


def load(path=K8S):
    kubectl = shutil.which("kubectl")
    if kubectl:
        p = subprocess.run([kubectl, "kustomize", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=60)
        if p.returncode != 0:
            err("kubectl kustomize %s failed: %s" % (path, p.stderr.strip()))
            return []
        notes.append("rendered with `kubectl kustomize` (%s)" % kubectl)
        return [d for d in yaml.safe_load_all(p.stdout) if d]
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        kz = yaml.safe_load(f)
    docs = []
    for r in kz["resources"]:
        with open(os.path.join(K8S, r)) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        if d["kind"] != "Namespace":
            d["metadata"].setdefault("namespace", kz.get("namespace"))
    notes.append("kubectl not installed: resource files loaded with PyYAML")
    return docs


def help_flags(binary):
    p = subprocess.run([binary, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=20)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", p.stdout))


def pod_spec(obj):
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Job":
        return obj["spec"]["template"]["spec"]
    return None


def flag_values(args):
    out = {}
    for a in args:
        m = re.match(r"^(--[a-z0-9-]+)(?:=(.*))?$", a)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def check(docs, bins):
    by = {}
    for d in docs:
        for f in ("apiVersion", "kind", "metadata"):
            if f not in d:
                err("an object without %s: %s" % (f, str(d)[:200]))
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        if not name:
            err("%s without metadata.name" % kind)
            continue
        if kind in API and d["apiVersion"] != API[kind]:
            err("%s/%s: apiVersion %s, want %s" % (kind, name, d["apiVersion"], API[kind]))
        if kind != "Namespace" and d["metadata"].get("namespace") != "medmoe":
            err("%s/%s: namespace %r, want medmoe" % (kind, name, d["metadata"].get("namespace")))
        if (kind, name) in by:
            err("%s/%s defined twice" % (kind, name))
        by[(kind, name)] = d
    if ("Namespace", "medmoe") not in by:
        err("no Namespace medmoe")

    help_of = {b: help_flags(p) for b, p in bins.items() if p}
    deployments = {n: d for (k, n), d in by.items() if k == "Deployment"}
    experts = {}
    router_ports = {}
    for (kind, name), d in sorted(by.items()):
        spec = pod_spec(d)
        if spec is None:
            continue
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        if kind == "Deployment":
            sel = d["spec"]["selector"]["matchLabels"]
            if not sel or any(labels.get(k) != v for k, v in sel.items()):
                err("Deployment/%s: selector %s does not match pod labels %s" % (name, sel, labels))
        sc = spec.get("securityContext", {})
        if not sc.get("runAsNonRoot") or sc.get("runAsUser") in (None, 0):
            err("%s/%s: pods must run as non-root (securityContext.runAsNonRoot/runAsUser)" % (kind, name))
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in by:
                err("%s/%s: volume %s names ConfigMap %s, not defined" % (kind, name, v["name"], v["configMap"]["name"]))
            if "secret" in v and ("Secret", v["secret"]["secretName"]) not in by:
                err("%s/%s: volume %s names Secret %s, not defined" % (kind, name, v["name"], v["secret"]["secretName"]))
        for c in spec["containers"]:
            cname = "%s/%s[%s]" % (kind, name, c.get("name"))
            if not c.get("name") or not c.get("image"):
                err("%s: container without name or image" % cname)
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if len(ports) != len(c.get("ports", [])):
                err("%s: container ports need unique names" % cname)
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                pr = c.get(probe)
                if not pr:
                    continue
                for how in ("grpc", "tcpSocket", "httpGet"):
                    if how in pr:
                        port = pr[how]["port"]
                        if port not in ports.values() and port not in ports:
                            err("%s: %s %s port %s is not a container port %s" % (cname, probe, how, port, ports))
            # files under mounted ConfigMaps/Secrets that the args name must be keys there
            mounts = {}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    err("%s: volumeMount %s has no volume" % (cname, m["name"]))
                    continue
                mounts[m["mountPath"].rstrip("/")] = volumes[m["name"]]
            text = " ".join(c.get("command", []) + c.get("args", []))
            for path in re.findall(r"(/etc/medmoe/[A-Za-z0-9_./-]+)", text):
                mdir, fname = os.path.dirname(path), os.path.basename(path)
                vol = mounts.get(mdir)
                if vol is None:
                    err("%s: %s is under no volumeMount" % (cname, path))
                    continue
                src = ("ConfigMap", vol["configMap"]["name"]) if "configMap" in vol else \
                      ("Secret", vol["secret"]["secretName"]) if "secret" in vol else None
                if src and src in by:
                    keys = set(by[src].get("data", {}) or {}) | set(by[src].get("stringData", {}) or {})
                    if fname not in keys:
                        err("%s: %s: %s %s has no key %s (keys %s)" % (cname, path, src[0], src[1], fname, sorted(keys)))
            prog = os.path.basename((c.get("command") or [""])[0])
            fv = flag_values(c.get("args", []))
            if prog in help_of:
                for flag in fv:
                    if flag not in help_of[prog]:
                        if flag in ASSUMED_FLAGS.get(prog, {}):
                            notes.append("ASSUMED: %s %s (%s) is not in its --help yet"
                                         % (prog, flag, ASSUMED_FLAGS[prog][flag]))
                        else:
                            err("%s: %s has no flag %s (see its --help)" % (cname, prog, flag))
            if prog == "medmoe-expert":
                k = int(fv["--expert"][0])
                if k in experts:
                    err("expert %d in two Deployments (%s, %s)" % (k, experts[k][0], name))
                experts[k] = (name, fv, labels)
                if labels.get("medmoe.io/expert") != str(k):
                    err("%s: label medmoe.io/expert %r, args say --expert=%d" % (cname, labels.get("medmoe.io/expert"), k))
            if prog == "medmoe-router":
                router_ports = ports
                gl = fv.get("--grpc-listen", [None])[0]
                rp = c.get("readinessProbe", {}).get("grpc", {})
                if not gl or not rp:
                    err("%s: the router needs --grpc-listen and a grpc readinessProbe" % cname)
                elif int(gl.rsplit(":", 1)[1]) != rp["port"] or ports.get("grpc") != rp["port"]:
                    err("%s: --grpc-listen %s, readiness grpc port %s, container port grpc %s disagree"
                        % (cname, gl, rp["port"], ports.get("grpc")))
                eb = fv.get("--experts-bind", [None])[0]
                if not eb or int(eb.rsplit(":", 1)[1]) != ports.get("experts"):
                    err("%s: --experts-bind %s vs container port experts %s" % (cname, eb, ports.get("experts")))
                # secure by default: keys from the mounted Secret, never the plaintext wire
                if "--insecure-experts" in fv or "--curve-secret-key" not in fv or "--curve-allow" not in fv:
                    err("%s: the router must use CurveZMQ (--curve-secret-key, --curve-allow), not "
                        "--insecure-experts" % cname)

    # Services: selector = some Deployment's pods; targetPorts are named container ports there
    svc = by.get(("Service", "medmoe-router"))
    if not svc:
        err("no Service medmoe-router")
    else:
        sel = svc["spec"]["selector"]
        matched = [n for n, d in deployments.items()
                   if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if matched != ["medmoe-router"]:
            err("Service medmoe-router selects %s, want exactly the router Deployment" % matched)
        for p in svc["spec"]["ports"]:
            if p["targetPort"] not in router_ports:
                err("Service medmoe-router port %s targets %r, not a router container port %s"
                    % (p["name"], p["targetPort"], router_ports))
        svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        for need in ("grpc", "experts"):
            if need not in svc_ports:
                err("Service medmoe-router has no %s port" % need)
        for k, (dname, fv, _) in sorted(experts.items()):
            ep = fv.get("--router", [""])[0]
            m = re.match(r"^tcp://([^:]+):(\d+)$", ep)
            if not m or m.group(1) not in ("medmoe-router", "medmoe-router.medmoe.svc",
                                           "medmoe-router.medmoe.svc.cluster.local") \
                    or int(m.group(2)) != svc_ports.get("experts"):
                err("Deployment/%s: --router %s is not the router Service's experts port %s"
                    % (dname, ep, svc_ports.get("experts")))
            if "--curve-key" not in fv or "--curve-server-key" not in fv:
                err("Deployment/%s: experts must use CurveZMQ (--curve-key, --curve-server-key)" % dname)
    if sorted(experts) != list(range(len(experts))) or not experts:
        err("expert Deployments host experts %s, want 0..N-1 each once" % sorted(experts))

    # HPAs: one per expert, on that expert's queue depth
    hpas = {n: d for (k, n), d in by.items() if k == "HorizontalPodAutoscaler"}
    covered = set()
    for n, h in sorted(hpas.items()):
        ref = h["spec"]["scaleTargetRef"]
        tgt = deployments.get(ref["name"])
        if ref.get("kind") != "Deployment" or tgt is None:
            err("HPA/%s targets %s/%s, not a Deployment here" % (n, ref.get("kind"), ref["name"]))
            continue
        if not 1 <= h["spec"].get("minReplicas", 1) <= h["spec"]["maxReplicas"]:
            err("HPA/%s: minReplicas/maxReplicas out of order" % n)
        k = tgt["spec"]["template"]["metadata"]["labels"].get("medmoe.io/expert")
        ok = False
        for m in h["spec"].get("metrics", []):
            if m.get("type") == "External":
                em = m["external"]["metric"]
                if em["name"] == "medmoe_expert_queue_depth" and \
                        em.get("selector", {}).get("matchLabels", {}).get("expert") == k:
                    ok = True
        if not ok:
            err("HPA/%s: no External metric medmoe_expert_queue_depth{expert=%r}" % (n, k))
        covered.add(int(k) if k is not None else -1)
    if covered != set(experts):
        err("HPAs cover experts %s, Deployments host %s" % (sorted(covered), sorted(experts)))

    # tenants ConfigMap: hashes only
    cm = by.get(("ConfigMap", "medmoe-tenants"))
    if not cm:
        err("no ConfigMap medmoe-tenants")
    else:
        t = json.loads(cm["data"]["tenants.json"])
        for e in t["tenants"]:
            if not re.match(r"^[0-9a-f]{64}$", e.get("key_sha256", "")) or set(e) - {"id", "key_sha256", "max_concurrent", "cases_per_minute"}:
                err("ConfigMap medmoe-tenants: entry %s must hold only id, key_sha256 (64 hex), quotas" % e.get("id"))
    for (kind, name), d in by.items():
        if kind == "Secret" and not (d.get("data") or d.get("stringData")):
            err("Secret/%s is empty" % name)
    return by


def check_gpu(docs):
    """The GPU overlay: the router and every expert run --backend=vulkan with exactly one
    nvidia.com/gpu, the runtime mounts the Vulkan ICD (NVIDIA_DRIVER_CAPABILITIES has graphics),
    and the GPU nodes' taint is tolerated; nothing else may ask for a GPU."""
    n = 0
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        name = d["metadata"]["name"]
        c = d["spec"]["template"]["spec"]["containers"][0]
        limits = c.get("resources", {}).get("limits", {})
        env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
        tol = d["spec"]["template"]["spec"].get("tolerations", [])
        n += 1
        if "--backend=vulkan" not in c.get("args", []):
            err("kubernetes-gpu: Deployment/%s does not pass --backend=vulkan" % name)
        if str(limits.get("nvidia.com/gpu")) != "1":
            err("kubernetes-gpu: Deployment/%s limits nvidia.com/gpu %r, want 1" % (name, limits.get("nvidia.com/gpu")))
        if "graphics" not in env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","):
            err("kubernetes-gpu: Deployment/%s: NVIDIA_DRIVER_CAPABILITIES lacks graphics (no Vulkan ICD)" % name)
        if not any(t.get("key") == "nvidia.com/gpu" for t in tol):
            err("kubernetes-gpu: Deployment/%s does not tolerate the nvidia.com/gpu taint" % name)
    for d in docs:
        spec = pod_spec(d)
        if d["kind"] != "Deployment" and spec and any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                                                      for c in spec["containers"]):
            err("kubernetes-gpu: %s/%s asks for a GPU" % (d["kind"], d["metadata"]["name"]))
    notes.append("kubernetes-gpu: %d Deployments with one GPU each" % n)


def check_dockerfile():
    path = os.path.join(ORCH, "Dockerfile")
    with open(path) as f:
        text = f.read()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    if not froms or not all(re.match(r"^debian:12", x) for x in froms):
        err("Dockerfile: every stage must be FROM debian:12* (got %s)" % froms)
    if "cmake --build" not in text or "apt-get install" not in text:
        err("Dockerfile: must install with apt-get and build with cmake")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1].split(":")[0] in ("0", "root"):
        err("Dockerfile: the final stage must run as a non-root USER (got %s)" % users)
    for copy in re.findall(r"^COPY\s+(?!--from)(\S+)\s", text, re.M):
        if "$" not in copy and not os.path.exists(os.path.join(ROOT, copy)):
            err("Dockerfile: COPY %s: no such path in the repo" % copy)


def check_example_config():
    path = os.path.join(ORCH, "medmoe-cluster")
    loader = importlib.machinery.SourceFileLoader("medmoe_cluster", path)
    spec = importlib.util.spec_from_loader("medmoe_cluster", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    with open(os.path.join(ORCH, "cluster.example.json")) as f:
        ex = json.load(f)

    def walk(d, ref, where):
        for k, v in d.items():
            if k.startswith("_") or k == "comment":
                continue
            if k not in ref:
                err("cluster.example.json: unknown key %s%s" % (where, k))
            elif isinstance(ref[k], dict):
                if not isinstance(v, dict):
                    err("cluster.example.json: %s%s must be an object" % (where, k))
                else:
                    walk(v, ref[k], where + k + ".")
    walk(ex, mod.DEFAULTS, "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router")
    ap.add_argument("--expert")
    a = ap.parse_args()
    docs = load()
    if docs:
        by = check(docs, {"medmoe-router": a.router, "medmoe-expert": a.expert})
        notes.append("%d objects: %s" % (len(by), ", ".join(sorted("%s/%s" % k for k in by))))
    if shutil.which("kubectl"):  # the overlay needs kustomize to render
        gdocs = load(K8S_GPU)
        if gdocs:
            check(gdocs, {"medmoe-router": a.router, "medmoe-expert": a.expert})
            check_gpu(gdocs)
    check_dockerfile()
    check_example_config()
    for n in notes:
        print("manifests: " + n)
    if errors:
        for e in errors:
            print("FAIL: " + e)
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
