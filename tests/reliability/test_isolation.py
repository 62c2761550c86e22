"""API-key isolation: cache namespaces, constant-time key checks, keys never logged, per-key rate limits.

Extends `tests/test_gateway_cache.py::test_namespaces_per_api_key` (Redis, non-streaming) and
`tests/test_gateway_failures.py::test_api_keys_and_rate_limit` (in-process limiter, sequential).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import gateway.auth
from gateway.auth import Authenticator, key_id
from gateway.config import AuthConfig
from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config
from tests.reliability.common import (
    assert_complete_stream,
    assert_openai_error,
    gateway_process,
    metric,
    private_redis,
    scrape,
)

KEY_A = "sk-alpha-7f3c9e21d4b8a6f0"
KEY_B = "sk-bravo-0e8d7c6b5a4f3e2d"
WRONG = "sk-wrong-d00dfeedcafe1234"
MSG = [{"role": "user", "content": "list three rivers"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with scripted_upstream("general") as up:
        yield up


def fresh_rate_window(margin_s: float = 6) -> None:
    """Rate limits use fixed one-minute windows: start a counting test well inside one."""
    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.05)


def _chat(url: str, key: str | None, stream: bool = False, **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=15,
                      json={"model": "auto", "messages": MSG, "temperature": 0, "stream": stream, **extra})


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-key", "shared"])
def test_cached_answer_never_crosses_keys(upstream: Upstream, monkeypatch: pytest.MonkeyPatch, backend: str,
                                          shared: bool) -> None:
    monkeypatch.setenv("REL_ISO_KEYS", f"{KEY_A},{KEY_B}")
    with private_redis() as rds:
        cfg = {"experts": [vllm_expert_config("general", upstream)],
               "cache": {"backend": backend, "url": rds.url, "timeout_ms": 1000, "shared": shared},
               "auth": {"api_keys_env": "REL_ISO_KEYS"}}
        with run_gateway(cfg, router=KeywordRouter(["general"])) as url:
            for stream in (False, True):
                extra = {"max_tokens": 3 if stream else 4}  # a fresh cache key for each round
                before = upstream.stats()["requests"]
                a1 = _chat(url, KEY_A, stream, **extra)
                a2 = _chat(url, KEY_A, stream, **extra)
                assert (a1.headers["x-octoroute-cache"], a2.headers["x-octoroute-cache"]) == ("miss", "hit")
                b1 = _chat(url, KEY_B, stream, **extra)
                b2 = _chat(url, KEY_B, not stream, **extra)
                if shared:
                    assert b1.headers["x-octoroute-cache"] == "hit"
                    assert upstream.stats()["requests"] == before + 1
                else:
                    assert b1.headers["x-octoroute-cache"] == "miss", "key B was served key A's cached answer"
                    assert b2.headers["x-octoroute-cache"] == "hit"  # B's own entry
                    assert upstream.stats()["requests"] == before + 2
                for r in (a1, a2, b1):
                    assert r.status_code == 200
                    if stream:
                        assert_complete_stream(r.text)
                anon = _chat(url, None, stream, **extra)
                assert anon.status_code == 401 and assert_openai_error(anon.json())["code"] == "invalid_api_key"
            if backend == "redis":
                names = b"\n".join(rds.client().keys("*"))
                for key in (KEY_A, KEY_B):
                    assert key.encode() not in names
                if not shared:
                    assert key_id(KEY_A).encode() in names and key_id(KEY_B).encode() in names


@pytest.mark.parametrize("which", ["first", "last", "none", "prefix", "longer"])
def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """Every configured key goes through ``hmac.compare_digest``, whichever one (if any) matches."""
    keys = [f"sk-key-{i:02d}-{'x' * 20}" for i in range(8)]
    auth = Authenticator(AuthConfig(api_keys=tuple(keys), api_keys_env=None), environ={})
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gateway.auth.hmac, "compare_digest", spy)
    presented = {"first": keys[0], "last": keys[-1], "none": "sk-nope", "prefix": keys[3][:-1],
                 "longer": keys[3] + "x"}[which]
    if which in ("first", "last"):
        assert auth.check(f"Bearer {presented}") == presented
    else:
        with pytest.raises(gateway.auth.OpenAIError) as info:
            auth.check(f"Bearer {presented}")
        assert info.value.status == 401 and presented not in info.value.message
    assert sorted(b for _, b in seen) == sorted(k.encode() for k in keys)  # all of them, no early exit
    assert all(a == presented.encode() for a, _ in seen)


def test_keys_never_logged(upstream: Upstream, tmp_path: Path) -> None:
    """A gateway process at DEBUG with keys, 401s, 429s, upstream errors, streams and hang-ups: no key text
    in its logs or metrics (requests are logged, by key id)."""
    upstream.control("ok")
    with scripted_upstream("broken") as broken:
        broken.control("fail", status=500)
        cfg = {"experts": [vllm_expert_config("general", upstream), vllm_expert_config("broken", broken, retries=0)],
               "default_expert": "general", "cache": {"backend": "memory"},
               "auth": {"api_keys_env": "REL_LOG_KEYS", "rate_limit_per_minute": 6},
               "logging": {"level": "DEBUG", "json": True}}
        with gateway_process(cfg, tmp_path, env={"REL_LOG_KEYS": f"{KEY_A},{KEY_B}"}) as gw:
            url = gw.url
            fresh_rate_window()
            statuses = [_chat(url, KEY_A, stream=i % 2 == 0, max_tokens=i + 1).status_code for i in range(8)]
            assert statuses[:6] == [200] * 6 and statuses[6:] == [429, 429]
            assert _chat(url, KEY_B).status_code == 200
            r = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY_B}"}, timeout=15,
                           json={"model": "broken", "messages": MSG})
            assert r.status_code == 502
            for bad in (WRONG, f"{KEY_A}x", KEY_A[:-1]):
                assert _chat(url, bad).status_code == 401
            r = httpx.get(f"{url}/v1/models", headers={"authorization": f"Basic {KEY_B}"}, timeout=5)
            assert r.status_code == 401
            with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY_B}"},
                              json={"model": "general", "messages": MSG, "stream": True}, timeout=15) as s:
                next(s.iter_lines())  # hang up
            metrics_text = scrape(url)
            assert gw.terminate() == 0
        logs = gw.logs()
    assert key_id(KEY_A) in logs and key_id(KEY_B) in logs  # requests are logged, by key id
    assert '"status":502' in logs.replace(" ", "")
    for secret in (KEY_A, KEY_B, WRONG, KEY_A[:-1], "sk-alpha", "sk-bravo"):
        assert secret not in logs, f"{secret!r} appears in the gateway's logs"
        assert secret not in metrics_text


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_one_keys_rate_limit_does_not_throttle_another(upstream: Upstream, monkeypatch: pytest.MonkeyPatch,
                                                        backend: str) -> None:
    """Key A floods (concurrently) past its limit while key B keeps getting answers."""
    monkeypatch.setenv("REL_RL_KEYS", f"{KEY_A},{KEY_B}")
    upstream.control("ok")
    with private_redis() as rds:
        cfg = {"experts": [vllm_expert_config("general", upstream)],
               "cache": {"backend": backend, "url": rds.url, "timeout_ms": 1000},
               "auth": {"api_keys_env": "REL_RL_KEYS", "rate_limit_per_minute": 20}}
        with run_gateway(cfg, router=KeywordRouter(["general"])) as url:
            fresh_rate_window()

            def plain(key: str) -> httpx.Response:
                return httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                  json={"model": "auto", "messages": MSG}, timeout=15)

            with ThreadPoolExecutor(8) as pool:
                flood = list(pool.map(plain, [KEY_A] * 60))
            a_status = [r.status_code for r in flood]
            assert a_status.count(200) == 20 and a_status.count(429) == 40, a_status
            for r in flood:
                if r.status_code == 429:
                    assert 1 <= int(r.headers["retry-after"]) <= 60
                    assert assert_openai_error(r.json())["code"] == "rate_limit_exceeded"
            b_status = [plain(KEY_B).status_code for _ in range(10)]
            assert b_status == [200] * 10, b_status
            assert metric(scrape(url), "octoroute_rejected_total", reason="rate_limited") == 40
            if backend == "redis":
                names = b"\n".join(rds.client().keys("*:rl:*"))
                assert key_id(KEY_A).encode() in names and KEY_A.encode() not in names
