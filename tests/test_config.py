"""Config loading: validation messages name the bad field; env overrides; `octoroute config check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config

GOOD = """
experts:
  - {name: math, backend: vllm, base_url: "http://127.0.0.1:8001/v1", model: Qwen/Qwen2.5-Math-1.5B-Instruct}
  - {name: general, backend: vllm, base_url: "http://127.0.0.1:8002/v1"}
default_expert: general
cache: {backend: redis, url: "redis://127.0.0.1:6379/0"}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_good_config_loads(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD), environ={})
    assert [e.name for e in config.experts] == ["math", "general"]
    assert config.expert("math").served_model == "Qwen/Qwen2.5-Math-1.5B-Instruct"
    assert config.expert("general").served_model == "general"


@pytest.mark.parametrize(("text", "needle"), [
    ("experts: []", "experts: List should have at least 1 item"),
    ("experts: [{name: a, backend: vllm}]", "experts.0: a vllm expert needs base_url"),
    ("experts: [{name: a, backend: gpu, base_url: 'http://x'}]", "experts.0.backend"),
    ("experts: [{name: a, backend: local}]", "experts.0: a local expert needs path"),
    ("experts: [{name: a, backend: vllm, base_url: 'ftp://x'}]", "base_url must start with http"),
    (GOOD + "cache: {backend: redis, ttl_s: -1}", "cache.ttl_s"),
    (GOOD + "fallback_expert: legal", "fallback_expert 'legal' is not an expert"),
    (GOOD + "surprise: 1", "surprise: Extra inputs are not permitted"),
    ("experts: [{name: auto, backend: vllm, base_url: 'http://x'}]", "reserved model names"),
    ("- just a list", "mapping at the top level"),
    ("experts: [", "not valid YAML"),
])
def test_bad_config_names_the_field(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert needle in str(info.value)


def test_env_overrides(tmp_path: Path) -> None:
    env = {"OCTOROUTE_CACHE__URL": "redis://cache:6379/3", "OCTOROUTE_CACHE__TTL_S": "60",
           "OCTOROUTE_EXPERTS__0__BASE_URL": "http://math:8000/v1", "OCTOROUTE_AUTH__RATE_LIMIT_PER_MINUTE": "10"}
    config = load_config(_write(tmp_path, GOOD), environ=env)
    assert config.cache.url == "redis://cache:6379/3" and config.cache.ttl_s == 60
    assert config.expert("math").base_url == "http://math:8000/v1"
    assert config.auth.rate_limit_per_minute == 10


def test_bad_env_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, GOOD), environ={"OCTOROUTE_CACHE__TTL_S": "soon"})
    assert "cache.ttl_s" in str(info.value)
    with pytest.raises(ConfigError, match="OCTOROUTE_EXPERTS__9__BASE_URL"):
        load_config(_write(tmp_path, GOOD), environ={"OCTOROUTE_EXPERTS__9__BASE_URL": "http://x"})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_embedded_default_is_valid() -> None:
    config = load_config(None, environ={})
    assert {e.backend for e in config.experts} == {"local"}
    assert config.cache.backend == "memory"


def test_config_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(_write(tmp_path, GOOD))]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["config", "check", str(_write(tmp_path, "experts: []"))]) == 2
    assert "experts" in capsys.readouterr().err


def test_example_configs_are_valid() -> None:
    paths = sorted((Path(__file__).resolve().parents[1] / "deploy").glob("config*.yaml"))
    assert paths, "deploy/config.example.yaml is missing"
    for path in paths:
        load_config(path, environ={})
