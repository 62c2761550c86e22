"""Upstream failures against real scripted upstream processes: retries, breaker, fallback, limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config

MSG = [{"role": "user", "content": "solve the equation"}]


@pytest.fixture
def pair() -> Iterator[tuple[Upstream, Upstream]]:
    with scripted_upstream("math") as math, scripted_upstream("general") as general:
        yield math, general


def _config(math: Upstream, general: Upstream, **math_extra: Any) -> dict[str, Any]:
    return {
        "experts": [vllm_expert_config("math", math, **math_extra), vllm_expert_config("general", general)],
        "default_expert": "general", "fallback_expert": "general", "cache": {"backend": "none"},
    }


def _chat(url: str, stream: bool = False, timeout: float = 10) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "auto", "messages": MSG, "stream": stream},
                      timeout=timeout)


def test_retries_5xx_before_first_byte(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("fail", status=503, fail_times=2)
    with run_gateway(_config(math, general, retries=2), router=KeywordRouter()) as url:
        r = _chat(url)
    assert r.status_code == 200 and r.headers["x-octoroute-expert"] == "math"
    assert math.stats()["failed"] == 2


def test_fallback_when_expert_keeps_failing_then_breaker_opens(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("fail", status=500)
    cfg = _config(math, general, retries=0, breaker={"failure_threshold": 2, "reset_after_s": 0.5})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        for _ in range(2):
            r = _chat(url)
            assert r.status_code == 200
            assert r.headers["x-octoroute-expert"] == "general"
            assert r.headers["x-octoroute-fallback-from"] == "math"
        failed = math.stats()["failed"]
        r = _chat(url)  # breaker open: math is not even tried
        assert r.headers["x-octoroute-expert"] == "general" and math.stats()["failed"] == failed
        assert 'octoroute_breaker_open{expert="math"} 1.0' in httpx.get(f"{url}/metrics").text
        math.control("ok")
        time.sleep(0.6)  # half-open: one probe goes to math, succeeds, breaker closes
        r = _chat(url)
        assert r.headers["x-octoroute-expert"] == "math" and "x-octoroute-fallback-from" not in r.headers
        assert 'octoroute_breaker_open{expert="math"} 0.0' in httpx.get(f"{url}/metrics").text


def test_no_fallback_gives_openai_error(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("fail", status=500)
    cfg = _config(math, general, retries=0)
    cfg["fallback_expert"] = None
    with run_gateway(cfg, router=KeywordRouter()) as url:
        r = _chat(url)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_http_5xx"


def test_upstream_4xx_is_passed_through_without_fallback(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("fail", status=400)
    with run_gateway(_config(math, general), router=KeywordRouter()) as url:
        r = _chat(url)
    assert r.status_code == 400 and r.json()["error"]["message"] == "scripted 400"
    assert general.stats()["requests"] == 0


def test_idle_timeout_mid_stream_gives_error_event(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("slow_chunks", delay_s=2)
    cfg = _config(math, general, timeouts={"idle_s": 0.3})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        r = _chat(url, stream=True)
        events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        error = orjson.loads(events[-1])["error"]
        assert error["code"] == "upstream_timeout" and set(error) == {"message", "type", "param", "code"}
        assert "[DONE]" not in r.text
        assert 'octoroute_upstream_errors_total{expert="math",kind="timeout"}' in httpx.get(f"{url}/metrics").text


def test_expert_dies_mid_stream(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("die_after", chunks=2)
    with run_gateway(_config(math, general), router=KeywordRouter()) as url:
        r = _chat(url, stream=True)
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert len(events) == 3  # two content chunks, then the error
    assert orjson.loads(events[-1])["error"]["type"] == "server_error"


def test_concurrency_limit_answers_429(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("slow_chunks", delay_s=0.5)
    with run_gateway(_config(math, general, max_concurrency=1), router=KeywordRouter()) as url:
        holder = threading.Thread(target=_chat, args=(url, True))
        holder.start()
        deadline = time.monotonic() + 10
        while math.stats()["requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = _chat(url)
        holder.join()
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_client_disconnect_cancels_upstream(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("slow_chunks", delay_s=0.2)
    with run_gateway(_config(math, general), router=KeywordRouter()) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions",
                          json={"model": "math", "messages": [{"role": "user", "content": "a b c d e f g h"}],
                                "stream": True}, timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # read one chunk, then hang up
        deadline = time.monotonic() + 5
        while math.stats()["cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert math.stats()["cancelled"] == 1
        assert math.stats()["completed"] == 0
        metrics = httpx.get(f"{url}/metrics").text
        assert 'octoroute_in_flight_requests{expert="math"} 0.0' in metrics
        assert 'status="499"' in metrics


def test_api_keys_and_rate_limit(pair: tuple[Upstream, Upstream], monkeypatch: pytest.MonkeyPatch) -> None:
    math, general = pair
    monkeypatch.setenv("TEST_KEYS", "alpha,beta")
    cfg = _config(math, general)
    cfg["auth"] = {"api_keys_env": "TEST_KEYS", "rate_limit_per_minute": 2}
    with run_gateway(cfg, router=KeywordRouter()) as url:
        missing = httpx.post(f"{url}/v1/chat/completions", json={"model": "auto", "messages": MSG})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer gamma"})
        assert wrong.status_code == 401
        alpha = {"authorization": "Bearer alpha"}
        statuses = [httpx.post(f"{url}/v1/chat/completions", headers=alpha,
                               json={"model": "auto", "messages": MSG}).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        beta = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": "Bearer beta"},
                          json={"model": "auto", "messages": MSG})
        assert beta.status_code == 200  # one key's limit does not throttle another
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_client_leaving_a_non_streaming_request_cancels_upstream(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("slow_first", delay_s=3)
    with run_gateway(_config(math, general), router=KeywordRouter()) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={"model": "math", "messages": MSG}, timeout=0.5)
        deadline = time.monotonic() + 5
        while "499" not in httpx.get(f"{url}/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = httpx.get(f"{url}/metrics").text
    assert 'status="499"' in metrics
    assert 'octoroute_in_flight_requests{expert="math"} 0.0' in metrics
