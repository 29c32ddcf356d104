"""What the linters cannot see: the deployment files agree with the service and with each other.

Run by deploy/ci-checks.sh with the CI tools' Python (PyYAML, jsonschema); exits 1 listing every problem.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
HEALTH_SERVICE = "faceenhance.v1.FaceEnhancer"
DRAIN_GRACE_S = 30.0

# Kinds that kubernetes-validate knows (it validates them strictly); anything else must be a
# CRD with a schema here, or the check fails instead of kubernetes-validate's mere warning.
CORE_KINDS = {"Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"}

# The fields of monitoring.coreos.com/v1 ServiceMonitor this project uses, strictly: a typo in
# a field name is an error, as kubernetes-validate --strict makes it for core kinds.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object"},
                "selector": {
                    "type": "object", "required": ["matchLabels"], "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                   "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["port"], "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}

problems: list[str] = []


def problem(where: str, message: str) -> None:
    problems.append(f"{where}: {message}")


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(ms|s|m|h)", str(text)):
        total += float(number) * units[unit]
    return total


def check_compose(gpu_json: str, cpu_json: str) -> None:
    for variant, path in (("gpu", gpu_json), ("cpu", cpu_json)):
        where = f"compose ({variant})"
        services = json.loads(Path(path).read_text())["services"]
        gfpgan = services.get("gfpgan")
        if gfpgan is None:
            problem(where, "no gfpgan service")
            continue
        devices = (gfpgan.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpus = [d for d in devices if "gpu" in d.get("capabilities", [])]
        if variant == "gpu" and not (len(gpus) == 1 and gpus[0].get("count") == 1):
            problem(where, f"gfpgan must reserve exactly one GPU, has {devices}")
        if variant == "cpu" and devices:
            problem(where, f"the CPU variant still reserves devices: {devices}")
        if "gfpgan-healthcheck" not in (gfpgan.get("healthcheck") or {}).get("test", []):
            problem(where, "gfpgan's healthcheck must ask the gRPC health service (gfpgan-healthcheck)")
        if not any(v.get("target") == "/weights" for v in gfpgan.get("volumes", [])):
            problem(where, "no volume mounted at /weights")
        if gfpgan.get("restart") not in ("always", "unless-stopped", "on-failure"):
            problem(where, f"restart policy is {gfpgan.get('restart')!r}")
        grace = duration_s(gfpgan.get("stop_grace_period", "10s"))
        drain = float(gfpgan.get("environment", {}).get("GFPGAN_DRAIN_GRACE_S", DRAIN_GRACE_S))
        if grace <= drain:
            problem(where, f"stop_grace_period {grace}s must exceed GFPGAN_DRAIN_GRACE_S {drain}s")
        published = {str(p.get("target")) for p in gfpgan.get("ports", [])}
        if not {"50051", "9090"} <= published:
            problem(where, f"gRPC 50051 and metrics 9090 must be published, got {sorted(published)}")
        worker = services.get("musetalk-worker")
        if worker is not None and "gfpgan:50051" not in worker.get("command", []):
            problem(where, "the example MuseTalk worker must point at gfpgan:50051")
        for name, service in services.items():
            for port in service.get("ports", []):
                if port.get("host_ip") != "127.0.0.1":
                    problem(where, f"{name} publishes {port.get('target')} on "
                                   f"{port.get('host_ip') or 'every interface'}: publish on "
                                   f"127.0.0.1 unless GFPGAN_PUBLISH_ADDRESS is set")


def check_compose_secure(secure_json: str) -> None:
    """deploy/compose/secure.yml: tokens and TLS from compose secrets, for the service, its
    health check and the worker."""
    where = "compose (secure)"
    services = json.loads(Path(secure_json).read_text())["services"]
    gfpgan, worker = services["gfpgan"], services.get("musetalk-worker", {})
    env = gfpgan.get("environment", {})
    mounted = {(s.get("target") or s.get("source")).rsplit("/", 1)[-1] for s in gfpgan.get("secrets", [])}
    for variable in ("GFPGAN_AUTH_TOKENS_FILE", "GFPGAN_TLS_CERT", "GFPGAN_TLS_KEY", "GFPGAN_TLS_CA"):
        path = env.get(variable, "")
        if not path.startswith("/run/secrets/") or path.rsplit("/", 1)[-1] not in mounted:
            problem(where, f"gfpgan's {variable} must name a mounted secret, is {path!r}")
    worker_env = worker.get("environment", {})
    if not (worker_env.get("GFPGAN_TLS_CA") and worker_env.get("GFPGAN_TOKEN_FILE")):
        problem(where, "the worker needs GFPGAN_TLS_CA and GFPGAN_TOKEN_FILE to reach the service")


def check_kubernetes(overlay: str, rendered: str) -> None:
    where = f"kubernetes ({overlay})"
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            for error in jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(doc):
                path = "/".join(str(p) for p in error.absolute_path)
                problem(where, f"ServiceMonitor {path}: {error.message}")
        elif doc["kind"] not in CORE_KINDS:
            problem(where, f"{doc['kind']} has no schema in the CI checks: add one to check_deploy.py")
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"):
        if kind not in by_kind:
            problem(where, f"no {kind} rendered")
    if problems:
        return
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "gfpgan")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}

    if service["spec"].get("clusterIP") != "None":
        problem(where, "the Service must be headless (clusterIP: None) for dns:/// round-robin")
    tls = "GFPGAN_TLS_CERT" in env
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container.get(probe, {}).get("grpc")
        command = container.get(probe, {}).get("exec", {}).get("command", [])
        if tls:  # the kubelet's gRPC probe cannot speak TLS: the image's health check can
            if grpc or command[:1] != ["gfpgan-healthcheck"]:
                problem(where, f"with TLS, {probe} must exec gfpgan-healthcheck, not a grpc probe")
        elif not grpc or grpc.get("port") != 50051:
            problem(where, f"{probe} must be a native grpc probe on port 50051")
    readiness = container.get("readinessProbe", {})
    if not tls and readiness.get("grpc", {}).get("service") != HEALTH_SERVICE:
        problem(where, f"readiness must ask for {HEALTH_SERVICE} (SERVING only once the model is up)")
    if tls and "--service" in readiness.get("exec", {}).get("command", []):
        problem(where, f"readiness must ask for {HEALTH_SERVICE} (gfpgan-healthcheck's default)")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    for variable in ("GFPGAN_AUTH_TOKENS_FILE", "GFPGAN_TLS_CERT", "GFPGAN_TLS_KEY"):
        path = env.get(variable)
        if path is not None and not any(path.startswith(m + "/") and mounts[m].get("readOnly")
                                        for m in mounts):
            problem(where, f"{variable} {path} must be on a read-only mounted volume")
    drain = float(env.get("GFPGAN_DRAIN_GRACE_S") or DRAIN_GRACE_S)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= drain + pre_stop:
        problem(where, f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + drain {drain}s")
    gpu_request = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if overlay in ("gpu", "secure") and str(gpu_request) != "1":
        problem(where, f"each replica must ask for nvidia.com/gpu: 1, asks {gpu_request}")
    if overlay == "cpu" and gpu_request is not None:
        problem(where, "the CPU overlay must not ask for a GPU")
    if not any("gfpgan-fetch-weights" in c.get("command", []) for c in pod["spec"].get("initContainers", [])):
        problem(where, "no init container fetching the weights")
    for kind in ("PodDisruptionBudget",):
        selector = by_kind[kind]["spec"].get("selector", {}).get("matchLabels", {})
        if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
            problem(where, f"{kind} selector {selector} must be non-empty and match the pods {pod_labels}")
    monitor = by_kind["ServiceMonitor"]["spec"]
    if any(service["metadata"]["labels"].get(k) != v for k, v in monitor["selector"]["matchLabels"].items()):
        problem(where, "the ServiceMonitor does not select the Service")
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        if endpoint["port"] not in ports:
            problem(where, f"ServiceMonitor port {endpoint['port']!r} is not a Service port {sorted(ports)}")
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    if hpa["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        problem(where, "the HPA does not scale the Deployment")
    adapter = yaml.safe_load((ROOT / "deploy/kubernetes/prometheus-adapter/values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    for metric in hpa["metrics"]:
        name = metric.get("pods", {}).get("metric", {}).get("name")
        if name and name not in served:
            problem(where, f"HPA metric {name} is not served by the prometheus-adapter rules {sorted(served)}")


def service_metric_names() -> set[str]:
    names = set()
    for source in ("server/metrics.py", "client/metrics.py"):
        names |= set(re.findall(r'"(faceenhance_[a-z_]+)"', (ROOT / source).read_text()))
    return names


def used_metric_names(text: str) -> set[str]:
    found = set()
    for name in re.findall(r"\b(faceenhance_[a-z_]+)", text):
        found.add(re.sub(r"_(total|bucket|sum|count|info)$", "", name))
    return found


def check_metric_names() -> None:
    known = service_metric_names()
    sources = {
        "grafana dashboard": ROOT / "deploy/grafana/dashboards/faceenhance.json",
        "alerts": ROOT / "deploy/prometheus/alerts.yml",
        "prometheus-adapter rules": ROOT / "deploy/kubernetes/prometheus-adapter/values.yaml",
    }
    dashboard = json.loads(sources["grafana dashboard"].read_text())
    for panel in dashboard["panels"]:
        if not panel.get("targets"):
            problem("grafana dashboard", f"panel {panel.get('title')!r} has no query")
    for where, path in sources.items():
        text = path.read_text()
        # Comments and the adapter's `as:` names (its own, e.g. faces/s) are not queries.
        text = re.sub(r"(?m)^\s*#.*$", "", text)
        text = re.sub(r'as: "[^"]*"', "", text)
        for name in sorted(used_metric_names(text) - known):
            problem(where, f"{name} is not a metric the service or client exports ({sorted(known)})")


def main(argv: list[str]) -> int:
    if argv[:1] == ["compose"] and len(argv) == 3:
        check_compose(argv[1], argv[2])
    elif argv[:1] == ["compose-secure"] and len(argv) == 2:
        check_compose_secure(argv[1])
    elif argv[:1] == ["kubernetes"] and len(argv) == 3:
        check_kubernetes(argv[1], argv[2])
    elif argv == ["metrics"]:
        check_metric_names()
    else:
        print("usage: check_deploy.py compose GPU.json CPU.json | compose-secure SECURE.json | "
              "kubernetes OVERLAY RENDERED.yaml | metrics",
              file=sys.stderr)
        return 2
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
