"""deploy/: compose stack, gateway image, Prometheus and Grafana files, checked without Docker.

- compose.yaml passes a strict Compose-spec parser once its variables are filled from
  .env.example (which must document exactly the variables it uses), and every file it mounts or
  builds from exists;
- the gateway config it mounts (deploy/config.example.yaml) loads with gateway/config.py and
  points at compose services that serve the models it names;
- the Dockerfile only COPYs files that exist and that .dockerignore lets through, and its final
  stage is non-root and compiler-free;
- every metric (and label) in the Grafana dashboard and the Prometheus rules is one the gateway
  registers in gateway.metrics.Metrics().registry.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import compose_spec
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway.config import load_config
from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "octoroute.json"
RULES = ROOT / "helm" / "octoroute" / "files" / "prometheus-rules.yaml"
GATEWAY_CONFIG_TARGET = "/etc/octoroute/config.yaml"


# ------------------------------------------------------------------------------- compose
COMPOSE_VAR = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(text: str, env: dict[str, str]) -> tuple[str, set[str], set[str]]:
    """Compose variable interpolation: (text, variables used, variables used without a default)."""
    used: set[str] = set()
    required: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        used.add(name)
        value = env.get(name)
        if op is None or "?" in op:
            required.add(name)
        unset = (op in (":-", ":?") and not value) or (op in ("-", "?") and value is None)
        if unset:
            if "?" in op:
                raise ValueError(f"compose needs {name}: {arg}")
            return arg
        return value or ""

    return COMPOSE_VAR.sub(sub, text), used, required


@cache
def compose() -> dict[str, Any]:
    """compose.yaml as Compose sees it with deploy/.env.example as its .env."""
    text, _, _ = interpolate(COMPOSE.read_text(), env_example())
    data = yaml.safe_load(text)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path, for bind mounts (short syntax, relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"use the short volume syntax: {volume}"
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def vllm_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if str(s.get("image", "")).startswith("vllm/vllm-openai")}


def test_compose_follows_the_compose_spec() -> None:
    """Strict Compose-spec parser (compose_spec, Rust): unknown keys and wrong types fail."""
    env = env_example()
    text, used, required = interpolate(COMPOSE.read_text(), env)
    assert required <= set(env), f"compose.yaml needs these without a default: {required - set(env)}"
    assert set(env) <= used, f".env.example documents variables compose.yaml never uses: {set(env) - used}"
    parsed = compose_spec.PyOptions(apply_merge=True).from_yaml(text)
    parsed.validate()
    with pytest.raises(ValueError, match="compose needs OCTOROUTE_API_KEYS"):
        interpolate(COMPOSE.read_text(), {k: v for k, v in env.items() if k != "OCTOROUTE_API_KEYS"})
    volumes = set(compose()["volumes"])
    for name, svc in services().items():
        for target in svc.get("depends_on", {}):
            assert target in services(), f"{name} depends on unknown service {target}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith((".", "/")) or source in volumes, f"{name}: volume {source} is not declared"


def test_compose_has_the_whole_stack() -> None:
    assert {"redis", "gateway", "prometheus", "grafana"} <= set(services())
    assert len(vllm_services()) == 4, sorted(vllm_services())
    for name, svc in vllm_services().items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert svc["entrypoint"] == ["vllm", "serve"] and "--served-model-name" in svc["command"], name
        assert "/health" in " ".join(svc["healthcheck"]["test"]), name
    gateway = services()["gateway"]
    assert gateway["read_only"] is True and "/tmp" in gateway["tmpfs"]
    assert not str(gateway["user"]).startswith(("0", "root"))


def test_compose_references_only_files_that_exist() -> None:
    missing = []
    for name, svc in services().items():
        for target, source in bind_mounts(svc).items():
            if not source.exists():
                missing.append(f"{name}: {source} (mounted at {target})")
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                missing.append(f"{name}: build {context}/{build.get('dockerfile')}")
        for env_file in svc.get("env_file", []):
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            if not (isinstance(env_file, dict) and env_file.get("required") is False) and not (DEPLOY / path).exists():
                missing.append(f"{name}: env_file {path}")
    assert not missing, "\n".join(missing)
    assert (DEPLOY / ".env.example").is_file()


def test_compose_gateway_config_points_at_compose_services() -> None:
    gateway = services()["gateway"]
    assert flag(gateway["command"], "--config") == GATEWAY_CONFIG_TARGET
    mounted = bind_mounts(gateway)[GATEWAY_CONFIG_TARGET]
    assert mounted == (DEPLOY / "config.example.yaml").resolve()
    cfg = load_config(mounted, environ={})
    assert {e.name for e in cfg.experts} == {"general", "legal", "finance", "math", "code"}
    for expert in cfg.experts:
        url = urlsplit(expert.base_url or "")
        svc = vllm_services().get(url.hostname or "")
        assert svc is not None, f"{expert.name}: {url.hostname} is not a vLLM service in compose.yaml"
        assert flag(svc["command"], "--port") == str(url.port) and url.path == "/v1"
        served = {flag(svc["command"], "--served-model-name")}
        if "--lora-modules" in svc["command"]:
            lora = svc["command"][svc["command"].index("--lora-modules") + 1:]
            served |= {m.split("=", 1)[0] for m in lora if "=" in m}
        assert expert.served_model in served, f"{expert.name}: {url.hostname} serves {served}"
        assert url.hostname in gateway["depends_on"]
        assert set(svc["networks"]) & set(gateway["networks"])
    assert cfg.cache.backend == "redis" and urlsplit(cfg.cache.url).hostname in services()
    assert cfg.auth.api_keys_env in gateway["environment"]
    assert not cfg.auth.api_keys, "keys belong in deploy/.env, not in the config"
    assert {cfg.default_expert, cfg.fallback_expert} <= {e.name for e in cfg.experts}


def test_prometheus_and_grafana_wiring() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    mounts = bind_mounts(services()["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == (DEPLOY / "prometheus.yml").resolve()
    rule_targets = [t for t in mounts if any(fnmatch.fnmatch(t, g) for g in prom["rule_files"])]
    assert [mounts[t] for t in rule_targets] == [RULES.resolve()]
    for job in prom["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in services(), f"{job['job_name']}: {host} is not a compose service"
                if host == "gateway":
                    assert flag(services()["gateway"]["command"], "--port") == port
    grafana_mounts = bind_mounts(services()["grafana"])
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and urlsplit(datasource["url"]).hostname == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "octoroute.yaml").read_text())["providers"][0]
    dashboard_target = next(t for t, s in grafana_mounts.items() if s == DASHBOARD.resolve())
    assert str(PurePosixPath(dashboard_target).parent) == provider["options"]["path"]


# ------------------------------------------------------------------------------ Dockerfile
def dockerfile_instructions() -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, stage = [], -1
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage += 1
        out.append((stage, instruction, rest.strip()))
    return out


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore semantics: the last pattern matching the path or a parent wins."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    excluded = False
    parts = PurePosixPath(path).parts
    for pattern in (p for p in patterns if p and not p.startswith("#")):
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_semantics_helper() -> None:
    assert dockerignore_excludes(".venv/bin/python") and dockerignore_excludes(".git/HEAD")
    assert dockerignore_excludes("tests/test_deploy.py")
    assert not dockerignore_excludes("gateway/config.py")
    assert dockerignore_excludes("gateway/__pycache__/config.cpython-311.pyc")


def test_dockerfile_copies_only_existing_included_files() -> None:
    copies = [(stage, rest) for stage, ins, rest in dockerfile_instructions() if ins in {"COPY", "ADD"}]
    assert copies
    problems = []
    for _, rest in copies:
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        for source in [w for w in words if not w.startswith("--")][:-1]:
            if not (ROOT / source).exists():
                problems.append(f"COPY source {source} does not exist")
            else:
                files = [source] if (ROOT / source).is_file() else [
                    str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file()]
                if any(dockerignore_excludes(f) for f in files if "__pycache__" not in f):
                    problems.append(f"COPY source {source} is excluded by .dockerignore")
    assert not problems, "\n".join(problems)


def test_dockerfile_final_stage_is_slim_and_non_root() -> None:
    instructions = dockerfile_instructions()
    stages = [rest for _, ins, rest in instructions if ins == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    final = len(stages) - 1
    final_ins = [(ins, rest) for stage, ins, rest in instructions if stage == final]
    assert "slim" in stages[final]
    users = [rest for ins, rest in final_ins if ins == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    for ins, rest in final_ins:
        if ins == "RUN":
            assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|rustc|cargo)\b", rest), rest
    assert any(ins == "COPY" and "--from=" in rest for ins, rest in final_ins)
    entrypoint = json.loads(next(rest for ins, rest in final_ins if ins == "ENTRYPOINT"))
    assert entrypoint == ["octoroute"]
    assert "/health" in next(rest for ins, rest in final_ins if ins == "HEALTHCHECK")
    expose = next(rest for ins, rest in final_ins if ins == "EXPOSE")
    assert expose == flag(services()["gateway"]["command"], "--port")
    # CPU torch, pinned to what pyproject.toml asks for.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.replace(" ", "").startswith("torch=="))
    arg = next(rest for _, ins, rest in instructions if ins == "ARG" and rest.startswith("TORCH_VERSION="))
    assert arg.split("=", 1)[1] == torch_pin.split("==", 1)[1]
    assert any("download.pytorch.org/whl/cpu" in rest for _, ins, rest in instructions if ins == "RUN")


# ------------------------------------------------------------------------------- metrics
@cache
def exported() -> dict[str, tuple[str, frozenset[str]]]:
    """Series name -> (metric family, label names), from the gateway's own registry."""
    metrics = Metrics()
    # prometheus_client keeps label names on the metric objects (_labelnames); collect() only lists
    # labels of series that exist, and a fresh registry has none.
    wrappers = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    labels = {m._name: frozenset(m._labelnames) for m in wrappers}
    families = list(metrics.registry.collect())
    assert {f.name for f in families} == set(labels), "a registered metric is not a Metrics attribute"
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "gauge": [""], "summary": ["", "_sum", "_count", "_created"]}
    names = {}
    for f in families:
        for suffix in suffixes[f.type]:
            names[f.name + suffix] = (f.name, labels[f.name] | ({"le"} if suffix == "_bucket" else set()))
    return names


# Grafana's interval variables, replaced by a duration so the expression parses as PromQL.
GRAFANA_INTERVALS = re.compile(r"\$\{?__(?:rate_interval|interval|range)\}?")


def promql_parts(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(series names, label names matched per series, grouping labels) of one PromQL expression.

    Parsed by promql-parser (a real PromQL grammar), so a syntax error fails the test too.
    """
    tree = promql_parser.parse(GRAFANA_INTERVALS.sub("5m", expr))
    names: set[str] = set()
    matchers: dict[str, set[str]] = {}
    grouping: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found = list(node.matchers.matchers) + [m for group in node.matchers.or_matchers for m in group]
            name = node.name or next((m.value for m in found if m.name == "__name__"), "")
            names.add(name)
            matchers.setdefault(name, set()).update(m.name for m in found if m.name != "__name__")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                grouping.update(node.modifier.matching.labels)
            grouping.update(node.modifier.group_labels or ())
        return True

    promql_parser.walk(tree, visit)
    return names, matchers, grouping


def metric_problems(expr: str, legend: str = "") -> list[str]:
    names, matchers, grouping = promql_parts(expr)
    problems = []
    if not names:
        problems.append(f"no metric in {expr!r}")
    known = exported()
    for name in sorted(names):
        if name not in known:
            problems.append(f"{name!r} is not exported by the gateway (in {expr!r})")
    labels = set().union(*(known[n][1] for n in names if n in known)) if names else set()
    for name, keys in matchers.items():
        allowed = known[name][1] if name in known else labels
        if keys - allowed - {"__name__"}:
            problems.append(f"labels {sorted(keys - allowed)} are not labels of {name or 'the series'} ({expr!r})")
    if grouping - labels:
        problems.append(f"grouping by {sorted(grouping - labels)}: not labels of {sorted(names)} ({expr!r})")
    legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    if legend_labels - grouping:
        problems.append(f"legend {legend!r} uses labels the query drops ({expr!r})")
    return problems


def test_promql_checker_catches_mistakes() -> None:
    assert not metric_problems('sum by (expert) (rate(octoroute_requests_total{status=~"5.."}[5m]))', "{{expert}}")
    assert metric_problems("rate(octoroute_request_total[5m])")  # missing s
    assert metric_problems("rate(octoroute_requests[5m])")  # counters are exported with _total
    assert metric_problems("sum by (expertt) (rate(octoroute_requests_total[5m]))")
    assert metric_problems('rate(octoroute_cache_total{expert="x"}[5m])')
    assert metric_problems("sum(rate(octoroute_tokens_total[5m]))", "{{direction}}")
    assert not metric_problems("histogram_quantile(0.95, sum by (le) (rate(octoroute_routing_seconds_bucket[1m])))")
    with pytest.raises(ValueError):  # not PromQL at all
        metric_problems("sum(rate(octoroute_requests_total[5m])")


def dashboard_targets() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found = []
        for p in panels:
            found += p.get("targets", []) + walk(p.get("panels", []))
        return found

    return walk(json.loads(DASHBOARD.read_text())["panels"])


def test_dashboard_queries_use_exported_metrics() -> None:
    targets = dashboard_targets()
    assert len(targets) >= 20
    problems = [p for t in targets for p in metric_problems(t["expr"], t.get("legendFormat", ""))]
    assert not problems, "\n".join(problems)
    used = set().union(*(promql_parts(t["expr"])[0] for t in targets))
    # routing mix, latency, cache hit rate, upstream errors, fusion use
    for name in ["octoroute_route_decisions_total", "octoroute_request_seconds_bucket", "octoroute_cache_total",
                 "octoroute_upstream_errors_total", "octoroute_fusion_steps_total",
                 "octoroute_time_to_first_token_seconds_bucket", "octoroute_breaker_open"]:
        assert name in used, f"the dashboard has no panel on {name}"


def test_dashboard_structure_and_variables() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variables["expert"]["definition"]).groups()
    assert label in exported()[metric][1]
    ids = []
    for panel in dash["panels"]:
        ids.append(panel["id"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    assert len(ids) == len(set(ids))


def test_prometheus_rules_use_exported_metrics() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert rules and all("alert" in r and r["labels"]["severity"] for r in rules)
    problems = [p for r in rules for p in metric_problems(r["expr"])]
    assert not problems, "\n".join(problems)
    for rule in rules:  # annotations may only use labels the expression keeps
        _, _, grouping = promql_parts(rule["expr"])
        used = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule.get("annotations", {}))))
        assert used <= grouping, f"{rule['alert']}: annotations use {used - grouping}"


@pytest.mark.parametrize("path", ["config.example.yaml", "compose.yaml", "prometheus.yml", "README.md"])
def test_deploy_files_exist(path: str) -> None:
    assert (DEPLOY / path).is_file()
