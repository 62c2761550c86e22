"""Expert faults against real upstream processes: killed mid-stream, slow, and clients that hang up.

Extends `tests/test_gateway_failures.py` (scripted `die_after`, single timeouts, one disconnect) with the
process really dying and coming back on the same port, timeouts with and without a fallback, and
disconnects under a cache (nothing partial stored) and in numbers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config
from tests.reliability.common import (
    assert_complete_stream,
    assert_error_stream,
    assert_openai_error,
    metric,
    poll,
    private_redis,
    scrape,
)

MATH = [{"role": "user", "content": "solve the equation one two three four five six seven eight"}]


@pytest.fixture
def pair() -> Iterator[tuple[Upstream, Upstream]]:
    with scripted_upstream("math") as math, scripted_upstream("general") as general:
        yield math, general


def _config(math: Upstream, general: Upstream, fallback: bool = True, cache: dict[str, Any] | None = None,
            **math_extra: Any) -> dict[str, Any]:
    return {"experts": [vllm_expert_config("math", math, **math_extra), vllm_expert_config("general", general)],
            "default_expert": "general", "fallback_expert": "general" if fallback else None,
            "cache": cache or {"backend": "none"}, "auth": {"api_keys_env": None}}


def _chat(url: str, stream: bool = False, timeout: float = 15, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                      json={"model": "auto", "messages": MATH, "stream": stream, **extra})


def test_killed_expert_breaker_fallback_and_recovery(pair: tuple[Upstream, Upstream]) -> None:
    """Kill the math upstream mid-stream: error event; breaker opens; general answers; restart: math again."""
    math, general = pair
    math.control("slow_chunks", delay_s=0.3)
    cfg = _config(math, general, retries=0, breaker={"failure_threshold": 2, "reset_after_s": 4.0})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        # 1. the expert process dies while a stream is being relayed
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=15,
                          json={"model": "auto", "messages": MATH, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-octoroute-expert"] == "math"
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            math.kill()
            started = time.monotonic()
            rest = [line for line in lines if line]  # the stream must close by itself
            closed_after = time.monotonic() - started
        err = assert_error_stream("\n".join([first, *rest]))
        assert err["type"] == "server_error" and err["code"] == "upstream_protocol", err
        assert closed_after < 5, f"the stream took {closed_after:.1f}s to close after the expert died"

        # 2. the next failure (connection refused, before the first byte) falls back and opens the breaker
        r = _chat(url)
        assert r.status_code == 200, r.text
        assert r.headers["x-octoroute-expert"] == "general" and r.headers["x-octoroute-fallback-from"] == "math"
        text = scrape(url)
        assert metric(text, "octoroute_breaker_open", expert="math") == 1.0
        assert metric(text, "octoroute_upstream_errors_total", expert="math", kind="connect_refused") == 1.0
        assert metric(text, "octoroute_upstream_errors_total", expert="math", kind="protocol") == 1.0

        # 3. while open, math is not even tried: streams and plain requests go straight to general
        for stream in (False, True):
            r = _chat(url, stream=stream)
            assert r.status_code == 200 and r.headers["x-octoroute-expert"] == "general"
            if stream:
                assert assert_complete_stream(r.text).startswith("general: ")
        text = scrape(url)
        assert metric(text, "octoroute_upstream_errors_total", expert="math") == 2.0
        assert metric(text, "octoroute_fallbacks_total", expert="math") >= 3.0

        # 4. the expert comes back on the same port: after reset_after_s a half-open probe returns traffic
        math.restart()
        math.control("ok")
        opened = time.monotonic()
        r = poll(lambda: (resp := _chat(url)).headers.get("x-octoroute-expert") == "math" and resp, 15,
                 "traffic back on math after a half-open probe", interval_s=0.1)
        assert time.monotonic() - opened < 12
        assert r.json()["choices"][0]["message"]["content"].startswith("math: ")
        assert "x-octoroute-fallback-from" not in r.headers
        assert metric(scrape(url), "octoroute_breaker_open", expert="math") == 0.0
        r = _chat(url, stream=True)
        assert r.headers["x-octoroute-expert"] == "math" and assert_complete_stream(r.text).startswith("math: ")
        assert metric(scrape(url), "octoroute_in_flight_requests", expert="math") == 0.0


def test_killed_expert_without_fallback_is_an_openai_503_with_retry_after(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    cfg = _config(math, general, fallback=False, retries=0, breaker={"failure_threshold": 1, "reset_after_s": 30})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        math.kill()
        r = _chat(url)
        assert r.status_code == 502 and assert_openai_error(r.json())["code"] == "upstream_connect"
        for stream in (False, True):  # breaker open: refused up front, never a hang
            r = _chat(url, stream=stream, timeout=5)
            assert r.status_code == 503 and r.headers["retry-after"] == "30"
            assert assert_openai_error(r.json())["code"] == "service_unavailable"
        assert metric(scrape(url), "octoroute_rejected_total", reason="breaker_open") == 2.0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_first_byte_timeout_falls_back_quickly(pair: tuple[Upstream, Upstream], stream: bool) -> None:
    math, general = pair
    math.control("slow_first", delay_s=30)
    cfg = _config(math, general, timeouts={"first_byte_s": 0.4})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        started = time.monotonic()
        r = _chat(url, stream=stream)
        elapsed = time.monotonic() - started
        assert r.status_code == 200 and r.headers["x-octoroute-expert"] == "general"
        assert r.headers["x-octoroute-fallback-from"] == "math"
        assert elapsed < 15, f"took {elapsed:.1f}s with a 0.4s first-byte timeout (the expert would take 30s)"
        if stream:
            assert_complete_stream(r.text)
        assert metric(scrape(url), "octoroute_upstream_errors_total", expert="math", kind="timeout") == 1.0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_first_byte_timeout_without_fallback_is_a_clear_504(pair: tuple[Upstream, Upstream], stream: bool) -> None:
    math, general = pair
    math.control("slow_first", delay_s=30)
    cfg = _config(math, general, fallback=False, timeouts={"first_byte_s": 0.4})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        started = time.monotonic()
        r = _chat(url, stream=stream)
        assert time.monotonic() - started < 15  # the expert would take 30 s
        assert r.status_code == 504, r.text
        err = assert_openai_error(r.json())
        assert err["type"] == "timeout_error" and err["code"] == "upstream_timeout"
        assert "0.4s" in err["message"]
        assert metric(scrape(url), "octoroute_in_flight_requests", expert="math") == 0.0


def test_idle_timeout_cuts_the_stream_and_cancels_the_upstream(pair: tuple[Upstream, Upstream]) -> None:
    """After the first byte there is nothing to fall back to: an error event, and the upstream is released."""
    math, general = pair
    math.control("slow_chunks", delay_s=3)
    cfg = _config(math, general, timeouts={"idle_s": 0.4})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        started = time.monotonic()
        r = _chat(url, stream=True)
        assert time.monotonic() - started < 5  # the whole answer would take ~30 s
        err = assert_error_stream(r.text)
        assert err["code"] == "upstream_timeout" and "no next chunk within 0.4s" in err["message"]
        assert general.stats()["requests"] == 0
        poll(lambda: math.stats()["cancelled"] == 1, 5, "the upstream saw the gateway hang up")
        assert math.stats()["completed"] == 0
        text = scrape(url)
        assert metric(text, "octoroute_in_flight_requests", expert="math") == 0.0
        assert metric(text, "octoroute_requests_total", expert="math", status="504") == 1.0


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_client_disconnects_cancel_upstream_and_cache_nothing(pair: tuple[Upstream, Upstream], backend: str) -> None:
    """Ten clients hang up mid-stream (and one mid-JSON): every upstream call is cancelled, nothing is cached."""
    math, general = pair
    math.control("slow_chunks", delay_s=0.3)
    with private_redis() as rds:
        cache = {"backend": backend, "url": rds.url, "timeout_ms": 1000}
        with run_gateway(_config(math, general, cache=cache), router=KeywordRouter()) as url:
            body = {"model": "math", "messages": MATH, "stream": True, "temperature": 0}

            def hang_up() -> None:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=15) as r:
                    assert r.headers["x-octoroute-cache"] == "miss"
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            return  # one chunk read, then the client goes away

            with ThreadPoolExecutor(10) as pool:
                for f in [pool.submit(hang_up) for _ in range(10)]:
                    f.result(timeout=30)
            math.control("slow_first", delay_s=5)
            with pytest.raises(httpx.ReadTimeout):  # and a non-streaming client that gives up waiting
                httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
            poll(lambda: math.stats()["cancelled"] == 10, 10, "ten upstream streams cancelled")
            poll(lambda: metric(scrape(url), "octoroute_requests_total", status="499") == 11, 10, "eleven 499s")
            assert math.stats()["completed"] == 0
            text = scrape(url)
            assert metric(text, "octoroute_in_flight_requests", expert="math") == 0.0
            assert metric(text, "octoroute_cache_total", result="store") == 0.0
            if backend == "redis":
                assert rds.client().keys("*:resp:*") == []
            math.control("ok")
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=15)
            assert r.headers["x-octoroute-cache"] == "miss"  # nothing from the partial answers
            full = assert_complete_stream(r.text)
            assert full == "math: " + MATH[0]["content"]
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=15)
            assert r.headers["x-octoroute-cache"] == "hit" and assert_complete_stream(r.text) == full


def test_disconnect_during_a_half_open_probe_lets_the_next_probe_through(pair: tuple[Upstream, Upstream]) -> None:
    math, general = pair
    math.control("fail", status=500, fail_times=1)
    cfg = _config(math, general, retries=0, breaker={"failure_threshold": 1, "reset_after_s": 0.3})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        assert _chat(url).headers["x-octoroute-expert"] == "general"  # math failed: open
        math.control("slow_chunks", delay_s=0.5)
        time.sleep(0.35)  # past reset_after_s: the next request is the half-open probe
        done = threading.Event()

        def probe_and_leave() -> None:
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=10,
                              json={"model": "auto", "messages": MATH, "stream": True}) as r:
                assert r.headers["x-octoroute-expert"] == "math"
                next(line for line in r.iter_lines() if line.startswith("data: "))
            done.set()

        probe_and_leave()
        assert done.is_set()
        poll(lambda: math.stats()["cancelled"] == 1, 5, "the probe's upstream call cancelled")
        math.control("ok")
        r = _chat(url)  # the abandoned probe gave no verdict: a new probe may go to math
        assert r.headers["x-octoroute-expert"] == "math", r.headers


def test_client_leaving_a_stream_before_its_first_byte_cancels_upstream(pair: tuple[Upstream, Upstream]) -> None:
    """A streaming client that gives up while the expert is still silent must free the expert's slot at once,
    not when (if ever) the first token arrives."""
    math, general = pair
    math.control("slow_first", delay_s=6)
    with run_gateway(_config(math, general), router=KeywordRouter()) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", timeout=0.5,
                       json={"model": "math", "messages": MATH, "stream": True})
        left = time.monotonic()
        poll(lambda: metric(scrape(url), "octoroute_in_flight_requests", expert="math") == 0, 3,
             "the expert's in-flight slot released after the client left")
        assert time.monotonic() - left < 3
        poll(lambda: metric(scrape(url), "octoroute_requests_total", expert="math", status="499") == 1, 3,
             "a 499 for the abandoned stream")
