"""The Helm chart (helm/octoroute), rendered by real Helm and checked without a cluster.

Helm comes from helm-python-sdk (Helm's Go SDK behind a C ABI), so rendering, values.schema.json
validation and `helm lint` are Helm's own. Every rendered object is validated against the
Kubernetes OpenAPI schemas of K8S_VERSION (kubernetes-validate, strict: unknown fields fail);
Prometheus Operator objects (ServiceMonitor, PrometheusRule) get a minimal structural check.
The gateway config the chart renders is loaded with the gateway's own loader (gateway/config.py).
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from gateway.config import (
    AuthConfig,
    CacheConfig,
    CorsConfig,
    ExpertConfig,
    FusionConfig,
    GatewayConfig,
    LoggingConfig,
    ResponsesConfig,
    RouterConfig,
    ServerConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "octoroute"
K8S_VERSION = "1.30.0"  # pinned; Chart.yaml allows >= 1.27, validated too
K8S_MIN_VERSION = "1.27.0"
RELEASE = "octo"
NAMESPACE = "ai"
SUFFIX = f".{NAMESPACE}.svc.cluster.local"
SENTINEL = "SENTINEL-secret-"  # every secret value in the value sets below starts with this

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external": {
        "experts": {
            "mode": "external",
            "external": [
                {"name": "general", "baseUrl": "https://llm.example.com/v1", "model": "qwen2.5-1.5b-instruct"},
                {"name": "math", "baseUrl": "http://math.models.svc:8000/v1", "labels": ["math", "stats"]},
                {"name": "code", "baseUrl": "https://code.example.com/v1", "apiKey": True,
                 "gateway": {"max_concurrency": 16, "timeouts": {"first_byte_s": 90}}},
            ],
        },
        "secrets": {"apiKeys": SENTINEL + "client-1," + SENTINEL + "client-2",
                    "upstreamApiKeys": {"code": SENTINEL + "upstream-code"}},
        "redis": {"mode": "external", "external": {"url": "redis://redis.cache.svc:6379/2"}},
    },
    "multilora": {
        "experts": {
            "mode": "multiLora",
            "vllm": {"requireApiKey": True,
                     "modelCache": {"type": "persistentVolumeClaim", "size": "80Gi", "storageClass": "fast"}},
            "multiLora": {
                "baseExpert": "general",
                "gpus": 2,
                "adapters": [
                    {"name": "legal", "path": "your-org/qwen2.5-1.5b-instruct-legal-lora"},
                    {"name": "finance", "path": "/models/adapters/finance", "labels": ["finance", "tax"]},
                ],
            },
        },
        "secrets": {"hfToken": SENTINEL + "hf", "vllmApiKey": SENTINEL + "vllm"},
    },
    "redis_internal": {
        "redis": {"mode": "internal", "internal": {"persistence": {"enabled": True, "size": "4Gi"}}},
        "experts": {"list": [{"name": "general", "model": "Qwen/Qwen2.5-1.5B-Instruct", "gpus": 1,
                              "resources": {"limits": {"memory": "24Gi"}}}]},
        "gateway": {"config": {"cache": {"ttl_s": 600}, "router": {"kind": "keyword"}}},
    },
    "ingress_monitoring": {
        "ingress": {"enabled": True, "className": "nginx",
                    "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
                    "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                    "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "prometheusRule": {"enabled": True}},
        "gateway": {"podAntiAffinity": "hard"},
    },
    "router_volume_existing_secret": {
        "router": {"checkpoint": {"source": "volume", "subPath": "v3",
                                  "volume": {"persistentVolumeClaim": {"claimName": "router-ckpt"}}}},
        "secrets": {"existingSecret": "octoroute-keys"},
        "redis": {"mode": "external", "external": {"existingSecret": "redis-creds", "existingSecretKey": "url"}},
        "experts": {"vllm": {"modelCache": {"type": "existingClaim", "existingClaim": "hf-cache"}}},
    },
    "router_init_no_auth": {
        "router": {"checkpoint": {"source": "initContainer",
                                  "initContainer": {"image": "registry.example.com/router-ckpt:3",
                                                    "command": ["sh", "-c", 'cp -r /ckpt/. "$ROUTER_DIR"']}}},
        "auth": {"enabled": False},
        "gateway": {"autoscaling": {"enabled": False}, "replicaCount": 3,
                    "pdb": {"maxUnavailable": 1}, "podAntiAffinity": "none"},
        "experts": {"vllm": {"requireApiKey": True}},
    },
}
SETS = list(VALUE_SETS)


# ----------------------------------------------------------------------------------- helpers
@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def render_raw(values: dict[str, Any]) -> dict[str, str]:
    return _chart().render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@functools.cache
def rendered(set_name: str) -> tuple[list[dict[str, Any]], str]:
    """(objects, NOTES.txt) of one value set."""
    manifests = render_raw(VALUE_SETS[set_name])
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, notes


def objs(set_name: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [o for o in rendered(set_name)[0] if kind is None or o["kind"] == kind]


def one(set_name: str, kind: str, component: str | None = None) -> dict[str, Any]:
    found = [o for o in objs(set_name, kind)
             if component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} ({component}), got {[o['metadata']['name'] for o in found]}"
    return found[0]


def gateway_deployment(set_name: str) -> dict[str, Any]:
    return one(set_name, "Deployment", "gateway")


def gateway_container(set_name: str) -> dict[str, Any]:
    return next(c for c in gateway_deployment(set_name)["spec"]["template"]["spec"]["containers"]
                if c["name"] == "gateway")


def raw_gateway_config(set_name: str) -> dict[str, Any]:
    return yaml.safe_load(one(set_name, "ConfigMap", "gateway")["data"]["config.yaml"])


def secret_env(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    """env name -> secretKeyRef, for env vars read from Secrets."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def gateway_config(set_name: str, tmp_path: Path) -> GatewayConfig:
    """Load the rendered config the way the pod does: the file plus the container's environment."""
    path = tmp_path / "config.yaml"
    path.write_text(one(set_name, "ConfigMap", "gateway")["data"]["config.yaml"])
    environ = {e["name"]: e["value"] for e in gateway_container(set_name).get("env", []) if "value" in e}
    environ |= {name: f"<{ref['name']}/{ref['key']}>" for name, ref in secret_env(gateway_container(set_name)).items()}
    return load_config(path, environ=environ)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def arg_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def check_prometheus_operator_object(obj: dict[str, Any]) -> list[str]:
    """Minimal structural check for CRDs that kubernetes-validate has no schema for."""
    errors = []
    if obj["apiVersion"] != "monitoring.coreos.com/v1":
        errors.append(f"unexpected apiVersion {obj['apiVersion']}")
    if not obj.get("metadata", {}).get("name"):
        errors.append("metadata.name missing")
    spec = obj.get("spec", {})
    if obj["kind"] == "ServiceMonitor":
        if not spec.get("selector", {}).get("matchLabels"):
            errors.append("spec.selector.matchLabels missing")
        endpoints = spec.get("endpoints") or []
        if not endpoints or not all(isinstance(e.get("port"), str) and e.get("path", "/").startswith("/")
                                    for e in endpoints):
            errors.append("spec.endpoints must name a port and a path")
    elif obj["kind"] == "PrometheusRule":
        groups = spec.get("groups") or []
        if not groups:
            errors.append("spec.groups is empty")
        for g in groups:
            for r in g.get("rules") or []:
                if not (("alert" in r) ^ ("record" in r)) or not isinstance(r.get("expr"), str):
                    errors.append(f"bad rule in group {g.get('name')}: {r}")
    else:
        errors.append(f"unknown kind {obj['kind']}")
    return errors


# ------------------------------------------------------------------------------ lint / schema
@pytest.mark.parametrize("set_name", SETS)
def test_helm_lint_is_clean(set_name: str) -> None:
    report = helm.lint(str(CHART), VALUE_SETS[set_name], strict=True, kube_version=f"v{K8S_VERSION}",
                       namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, json.dumps(problems, indent=2)


@pytest.mark.parametrize("version", [K8S_VERSION, K8S_MIN_VERSION])
@pytest.mark.parametrize("set_name", SETS)
def test_every_object_is_valid_kubernetes(set_name: str, version: str) -> None:
    errors = []
    for obj in objs(set_name):
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            errors += [f"{where}: {e}" for e in check_prometheus_operator_object(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_all_value_sets_render_distinct_objects() -> None:
    for set_name in SETS:
        names = [(o["kind"], o["metadata"]["name"]) for o in objs(set_name)]
        assert len(names) == len(set(names)), f"{set_name}: duplicate objects {names}"
        assert all(o["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE
                   for o in objs(set_name)), set_name


# ------------------------------------------------------------------------- gateway config
@pytest.mark.parametrize("set_name", SETS)
def test_rendered_gateway_config_validates(set_name: str, tmp_path: Path) -> None:
    raw = raw_gateway_config(set_name)
    if set_name != "router_volume_existing_secret":  # that one gets cache.url from the environment
        GatewayConfig.model_validate(raw)
    cfg = gateway_config(set_name, tmp_path)
    assert cfg.server.host == "0.0.0.0"
    container = gateway_container(set_name)
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert cfg.server.port == port == int(arg_value(container["args"], "--port"))
    assert arg_value(container["args"], "--config") == "/etc/octoroute/config.yaml"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/octoroute" and mount.get("readOnly")


@pytest.mark.parametrize("set_name", SETS)
def test_experts_point_at_rendered_services(set_name: str, tmp_path: Path) -> None:
    cfg = gateway_config(set_name, tmp_path)
    services = {s["metadata"]["name"]: s for s in objs(set_name, "Service")}
    deployments = objs(set_name, "Deployment")
    mode = VALUE_SETS[set_name].get("experts", {}).get("mode", "vllm")
    for expert in cfg.experts:
        assert expert.base_url
        url = urlsplit(expert.base_url)
        if mode == "external":
            wanted = next(e for e in VALUE_SETS[set_name]["experts"]["external"] if e["name"] == expert.name)
            assert expert.base_url == wanted["baseUrl"]
            continue
        assert url.hostname and url.hostname.endswith(SUFFIX), expert.base_url
        assert url.path == "/v1"
        svc = services.get(url.hostname.removesuffix(SUFFIX))
        assert svc is not None, f"{expert.name}: {url.hostname} is not a rendered Service"
        port = next((p for p in svc["spec"]["ports"] if p["port"] == url.port), None)
        assert port is not None, f"{expert.name}: Service {svc['metadata']['name']} has no port {url.port}"
        backends = [d for d in deployments
                    if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(backends) == 1, f"{expert.name}: Service selects {len(backends)} Deployments"
        container = backends[0]["spec"]["template"]["spec"]["containers"][0]
        assert any(p["name"] == port["targetPort"] and p["containerPort"] == url.port for p in container["ports"])
        args = container["args"]
        served = {arg_value(args, "--served-model-name")}
        if "--lora-modules" in args:
            served |= {a.split("=", 1)[0] for a in args[args.index("--lora-modules") + 1:] if "=" in a}
        assert expert.served_model in served, f"{expert.name}: vLLM serves {served}, not {expert.served_model}"


def test_expert_deployments_follow_values() -> None:
    values = _chart().values["experts"]
    experts = objs("defaults", "Deployment")
    by_expert = {d["metadata"]["labels"].get("octoroute.io/expert"): d for d in experts}
    assert set(by_expert) - {None} == {e["name"] for e in values["list"]}
    for entry in values["list"]:
        pod = by_expert[entry["name"]]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"].startswith("vllm/vllm-openai:")
        assert c["command"] == ["vllm", "serve"] and c["args"][0] == entry["model"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == values["vllm"]["gpus"]
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] == "/health"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "model load needs time"
        assert {"HF_HOME", "HF_TOKEN"} <= {e["name"] for e in c["env"]}
        hf = next(e for e in c["env"] if e["name"] == "HF_TOKEN")["valueFrom"]["secretKeyRef"]
        assert hf["optional"] is True and hf["key"] == "hf-token"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["model-cache"] and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        if "maxModelLen" in entry:
            assert arg_value(c["args"], "--max-model-len") == str(entry["maxModelLen"])


def test_multilora_server_serves_every_adapter_with_shared_key() -> None:
    server = one("multilora", "Deployment", "expert")
    c = server["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert "--enable-lora" in args and arg_value(args, "--tensor-parallel-size") == "2"
    lora = args[args.index("--lora-modules") + 1:]
    assert lora[:2] == ["legal=your-org/qwen2.5-1.5b-instruct-legal-lora", "finance=/models/adapters/finance"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert secret_env(c)["VLLM_API_KEY"]["key"] == "vllm-api-key"
    cfg = raw_gateway_config("multilora")
    assert [e["name"] for e in cfg["experts"]] == ["general", "legal", "finance"]
    assert {e["api_key_env"] for e in cfg["experts"]} == {"VLLM_API_KEY"}
    assert next(e for e in cfg["experts"] if e["name"] == "finance")["labels"] == ["finance", "tax"]
    pvc = one("multilora", "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast" and pvc["spec"]["resources"]["requests"]["storage"] == "80Gi"
    claim = next(v for v in server["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-cache")
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


# ---------------------------------------------------------------------------------- Redis
def test_in_chart_redis_is_what_the_gateway_uses(tmp_path: Path) -> None:
    cfg = gateway_config("redis_internal", tmp_path)
    assert cfg.cache.backend == "redis" and cfg.cache.ttl_s == 600
    url = urlsplit(cfg.cache.url)
    assert url.scheme == "redis" and url.hostname and url.hostname.endswith(SUFFIX)
    svc = next(s for s in objs("redis_internal", "Service")
               if s["metadata"]["name"] == url.hostname.removesuffix(SUFFIX))
    assert url.port in [p["port"] for p in svc["spec"]["ports"]]
    sts = one("redis_internal", "StatefulSet", "redis")
    assert selects(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "4Gi"
    netpol = one("redis_internal", "NetworkPolicy", "redis")
    allowed = netpol["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert selects(allowed, gateway_deployment("redis_internal")["spec"]["template"]["metadata"]["labels"])
    assert not objs("defaults", "StatefulSet"), "Redis is optional and off by default"


def test_external_redis_url_plain_or_from_secret(tmp_path: Path) -> None:
    assert gateway_config("external", tmp_path).cache.url == "redis://redis.cache.svc:6379/2"
    raw = raw_gateway_config("router_volume_existing_secret")
    assert raw["cache"]["backend"] == "redis" and "url" not in raw["cache"]
    ref = secret_env(gateway_container("router_volume_existing_secret"))["OCTOROUTE_CACHE__URL"]
    assert ref == {"name": "redis-creds", "key": "url"}
    assert gateway_config("router_volume_existing_secret", tmp_path).cache.url == "<redis-creds/url>"
    assert gateway_config("defaults", tmp_path).cache.backend == "memory"


# ----------------------------------------------------------------------- probes / security
@pytest.mark.parametrize("set_name", SETS)
def test_gateway_probes_hit_health_and_ready(set_name: str) -> None:
    c = gateway_container(set_name)
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert any(p["name"] == "http" for p in c["ports"])
    svc = one(set_name, "Service", "gateway")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert selects(svc["spec"]["selector"], gateway_deployment(set_name)["spec"]["template"]["metadata"]["labels"])
    for d in objs(set_name, "Deployment"):
        for container in d["spec"]["template"]["spec"]["containers"]:
            assert {"livenessProbe", "readinessProbe"} <= set(container), d["metadata"]["name"]


def test_gateway_pod_hardening() -> None:
    dep = gateway_deployment("defaults")
    pod = dep["spec"]["template"]["spec"]
    c = gateway_container("defaults")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    pref = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(pref["podAffinityTerm"]["labelSelector"]["matchLabels"], pod_labels)
    assert pod["automountServiceAccountToken"] is False
    grace = raw_gateway_config("defaults")["server"]["shutdown_grace_s"]
    assert pod["terminationGracePeriodSeconds"] > grace
    hard = gateway_deployment("ingress_monitoring")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in hard
    assert "affinity" not in gateway_deployment("router_init_no_auth")["spec"]["template"]["spec"]


def test_hpa_and_pdb_target_the_gateway() -> None:
    dep = gateway_deployment("defaults")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = one("defaults", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = one("defaults", "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] == 1
    assert not objs("router_init_no_auth", "HorizontalPodAutoscaler")
    assert gateway_deployment("router_init_no_auth")["spec"]["replicas"] == 3
    assert one("router_init_no_auth", "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1, "selector": pdb["spec"]["selector"]}


# ---------------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("set_name", SETS)
def test_secrets_are_never_inlined(set_name: str, tmp_path: Path) -> None:
    for obj in objs(set_name):
        if obj["kind"] != "Secret":
            assert SENTINEL not in json.dumps(obj), f"secret value inlined in {obj['kind']}/{obj['metadata']['name']}"
    assert SENTINEL not in rendered(set_name)[1], "secret value in NOTES.txt"
    raw = raw_gateway_config(set_name)
    assert not raw.get("auth", {}).get("api_keys"), "API keys must come from the environment"
    cfg = gateway_config(set_name, tmp_path)
    env = secret_env(gateway_container(set_name))
    wanted = {e.api_key_env for e in cfg.experts if e.api_key_env} | (
        {cfg.auth.api_keys_env} if cfg.auth.api_keys_env else set()) | {cfg.cache.secret_env}
    secrets = {s["metadata"]["name"]: s for s in objs(set_name, "Secret")}
    existing = VALUE_SETS[set_name].get("secrets", {}).get("existingSecret")
    for name in wanted:
        assert name in env, f"{name} is named in the config but not set from a Secret"
        ref = env[name]
        if existing:
            assert ref["name"] == existing and not secrets
        else:
            assert ref["key"] in secrets[ref["name"]]["data"], f"{name}: Secret has no key {ref['key']}"
    if not _chart().merge_values(VALUE_SETS[set_name])["auth"]["enabled"]:
        assert cfg.auth.api_keys_env is None and "OCTOROUTE_API_KEYS" not in env


def test_secret_values_land_in_the_secret() -> None:
    data = {k: base64.b64decode(v).decode() for k, v in one("external", "Secret")["data"].items()}
    assert len(data.pop("cache-secret")) >= 32, "replicas share one generated cache HMAC key"
    assert data == {"api-keys": SENTINEL + "client-1," + SENTINEL + "client-2",
                    "upstream-code": SENTINEL + "upstream-code"}
    cfg = raw_gateway_config("external")
    assert next(e for e in cfg["experts"] if e["name"] == "code")["api_key_env"] == "UPSTREAM_API_KEY_CODE"
    assert all("api_key_env" not in e for e in cfg["experts"] if e["name"] != "code")
    generated = base64.b64decode(one("defaults", "Secret")["data"]["api-keys"]).decode()
    assert len(generated) >= 32, "an empty secrets.apiKeys gets a generated key"
    ml = {k: base64.b64decode(v).decode() for k, v in one("multilora", "Secret")["data"].items()}
    assert ml["hf-token"] == SENTINEL + "hf" and ml["vllm-api-key"] == SENTINEL + "vllm"


# ---------------------------------------------------------------- router checkpoint, extras
def test_router_checkpoint_from_volume_or_init_container(tmp_path: Path) -> None:
    assert gateway_config("defaults", tmp_path).router.path is None  # bundled checkpoint
    for set_name in ("router_volume_existing_secret", "router_init_no_auth"):
        ckpt = _chart().merge_values(VALUE_SETS[set_name])["router"]["checkpoint"]
        cfg = gateway_config(set_name, tmp_path)
        pod = gateway_deployment(set_name)["spec"]["template"]["spec"]
        mount = next(m for m in gateway_container(set_name)["volumeMounts"] if m["name"] == "router-checkpoint")
        assert mount["mountPath"] == ckpt["mountPath"] and mount["readOnly"] is True
        assert cfg.router.path == "/".join(p for p in (ckpt["mountPath"], ckpt["subPath"]) if p)
        volume = next(v for v in pod["volumes"] if v["name"] == "router-checkpoint")
        if ckpt["source"] == "volume":
            assert volume["persistentVolumeClaim"] == {"claimName": "router-ckpt"}
        else:
            init = pod["initContainers"][0]
            assert "emptyDir" in volume and init["image"] == ckpt["initContainer"]["image"]
            assert {"name": "ROUTER_DIR", "value": ckpt["mountPath"]} in init["env"]
            assert any(m["name"] == "router-checkpoint" and m["mountPath"] == ckpt["mountPath"]
                       for m in init["volumeMounts"])


def test_ingress_and_prometheus_operator_objects() -> None:
    svc = one("ingress_monitoring", "Service", "gateway")
    ingress = one("ingress_monitoring", "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"]
    assert backend["port"]["name"] in [p["name"] for p in svc["spec"]["ports"]]
    assert ingress["spec"]["ingressClassName"] == "nginx" and ingress["spec"]["tls"][0]["secretName"] == "llm-tls"
    monitors = {m["metadata"]["labels"]["app.kubernetes.io/component"]: m
                for m in objs("ingress_monitoring", "ServiceMonitor")}
    assert set(monitors) == {"gateway", "expert"}
    for component, monitor in monitors.items():
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        targets = [s for s in objs("ingress_monitoring", "Service")
                   if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert targets, f"{component} ServiceMonitor selects no Service"
        for s in targets:
            assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in s["spec"]["ports"]]
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    rule = one("ingress_monitoring", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert not objs("defaults", "Ingress") and not objs("defaults", "ServiceMonitor")


def test_notes_list_the_experts() -> None:
    notes = rendered("defaults")[1]
    for expert in raw_gateway_config("defaults")["experts"]:
        assert expert["base_url"] in notes
    assert "port-forward" in notes and "api-keys" in notes


# ------------------------------------------------------------------------- rejected values
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"experts": {"mode": "vlm"}}, "at '/experts/mode': value must be one of"),
        ({"redis": {"external": {"url": "redis://:hunter2@cache:6379/0"}}}, "at '/redis/external/url'"),
        ({"experts": {"list": [{"name": "Math_Expert", "model": "x"}]}}, "at '/experts/list/0/name'"),
        ({"experts": {"list": [{"name": "math"}]}}, "missing property 'model'"),
        ({"gateway": {"config": {"auth": {"api_keys": ["sk-1"]}}}}, "additional properties 'api_keys' not allowed"),
        ({"gateway": {"replicas": 3}}, "additional properties 'replicas' not allowed"),
        ({"experts": {"vllm": {"gpus": -1}}}, "at '/experts/vllm/gpus'"),
        ({"gateway": {"config": {"cache": {"backend": "redis"}}}}, "at '/gateway/config/cache/backend'"),
        ({"gateway": {"config": {"router": {"path": "/x"}}}}, "additional properties 'path' not allowed"),
    ],
)
def test_schema_rejects_bad_values_readably(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render_raw(values)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"config": {"default_expert": "legal"}}},
         'gateway.config.default_expert "legal" is not an expert; known: general, math, code'),
        ({"experts": {"list": [{"name": "auto", "model": "x"}]}}, 'expert name "auto" is reserved'),
        ({"experts": {"list": [{"name": "general", "model": "a"}, {"name": "general", "model": "b"}]}},
         '"general" appears twice'),
        ({"redis": {"mode": "external"}}, "set redis.external.url"),
        ({"experts": {"mode": "external", "external": [{"name": "general", "baseUrl": "http://x/v1", "apiKey": True}]}},
         "secrets.upstreamApiKeys.general is not set"),
        ({"router": {"checkpoint": {"source": "volume"}}}, "set router.checkpoint.volume"),
    ],
)
def test_templates_reject_inconsistent_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        render_raw(values)
    assert message in str(err.value), str(err.value)


# Config fields the chart fills in itself (never from gateway.config values).
CHART_OWNED = {"server": {"host", "port"}, "router": {"path"}, "cache": {"url"}, "auth": {"api_keys", "api_keys_env"}}


def test_values_schema_matches_gateway_config() -> None:
    """gateway.config in values.schema.json offers exactly the gateway's fields, minus the chart's own."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["gateway"]["properties"]["config"]["properties"]
    models = {"server": ServerConfig, "router": RouterConfig, "cache": CacheConfig, "auth": AuthConfig,
              "cors": CorsConfig, "fusion": FusionConfig, "responses": ResponsesConfig, "logging": LoggingConfig}
    top = {f.alias or n for n, f in GatewayConfig.model_fields.items()}
    assert set(config) == top - {"experts"}, "gateway.config sections differ from GatewayConfig"
    for section, model in models.items():
        known = {f.alias or n for n, f in model.model_fields.items()}
        offered = set(config[section]["properties"])
        assert offered <= known, f"gateway.config.{section}: {offered - known} not in {model.__name__}"
        missing = known - offered - CHART_OWNED.get(section, set())
        assert not missing, (f"{model.__name__} has fields {sorted(missing)} that values.schema.json does not offer "
                             f"under gateway.config.{section}: add them there")
    expert_schema = schema["properties"]["experts"]["properties"]["list"]["items"]["properties"]["gateway"]
    per_expert = {"max_concurrency", "retries", "timeouts", "breaker"}
    assert set(expert_schema["properties"]) == per_expert
    assert per_expert <= set(ExpertConfig.model_fields)
