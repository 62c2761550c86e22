"""Time and space bounds of a streamed answer: total_s, idle_s against keep-alive comments, compounding
timeouts before a fallback, and a client that stops reading while its expert slot is held.

Scripted upstream processes and the gateway on loopback; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config
from tests.reliability.common import assert_error_stream, poll

MATH = [{"role": "user", "content": "solve one two three four five six seven eight nine ten"}]


@pytest.fixture
def pair() -> Iterator[tuple[Upstream, Upstream]]:
    with scripted_upstream("math") as math, scripted_upstream("general") as general:
        yield math, general


def _config(math: Upstream, general: Upstream, fallback: bool = False, **math_extra: Any) -> dict[str, Any]:
    return {"experts": [vllm_expert_config("math", math, **math_extra), vllm_expert_config("general", general)],
            "default_expert": "general", "fallback_expert": "general" if fallback else None,
            "cache": {"backend": "none"}, "auth": {"api_keys_env": None}}


def _stream(url: str, timeout: float = 10) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                   json={"model": "math", "messages": MATH, "stream": True})
    return r, time.monotonic() - started


def test_total_s_ends_a_steady_stream_with_an_error_event(pair: tuple[Upstream, Upstream]) -> None:
    """One chunk every 0.4 s never trips idle_s, but the whole answer is bounded by total_s (was: it ran on)."""
    math, general = pair
    math.control("slow_chunks", delay_s=0.4)
    cfg = _config(math, general, timeouts={"total_s": 1.5, "idle_s": 5, "first_byte_s": 5})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        r, took = _stream(url)
    err = assert_error_stream(r.text)
    assert err["code"] == "upstream_timeout" and "total_s" in err["message"], err
    assert 1.4 < took < 3.0, f"the stream ended after {took:.2f}s with total_s 1.5"


def test_keepalive_comments_do_not_reset_idle_s(pair: tuple[Upstream, Upstream]) -> None:
    """After one chunk the upstream only sends ``: keep-alive`` comments (every 0.2 s): no data for idle_s (1 s)
    ends the stream (was: open as long as the comments came)."""
    math, general = pair
    math.control("keepalive", delay_s=0.2)
    with run_gateway(_config(math, general, timeouts={"idle_s": 1.0}), router=KeywordRouter()) as url:
        r, took = _stream(url)
    err = assert_error_stream(r.text)
    assert err["code"] == "upstream_timeout" and "idle_s" in err["message"], err
    assert took < 3.0, f"took {took:.2f}s with idle_s 1"
    poll(lambda: math.stats()["cancelled"] >= 1, 5, "the upstream call closed")


def test_first_byte_s_bounds_all_retries_before_the_fallback(pair: tuple[Upstream, Upstream]) -> None:
    """A slow 5xx (0.8 s each) with 2 retries: the fallback answers within first_byte_s (1 s) plus its own
    time, not after (retries + 1) x the slow failure (2.4 s and more)."""
    math, general = pair
    math.control("fail", status=503, delay_s=0.8)
    cfg = _config(math, general, fallback=True, retries=2, timeouts={"first_byte_s": 1.0})
    with run_gateway(cfg, router=KeywordRouter()) as url:
        started = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=15, json={"model": "math", "messages": MATH})
        took = time.monotonic() - started
    assert r.status_code == 200 and r.headers["x-octoroute-fallback-from"] == "math", r.text
    assert took < 1.8, f"the fallback answered after {took:.2f}s with first_byte_s 1"


def _never_reading_client(port: int) -> socket.socket:
    """A streamed request whose client then never reads (tiny receive buffer, nothing read)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = orjson.dumps({"model": "math", "messages": MATH, "stream": True})
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_clients_that_stop_reading_lose_their_expert_slots(pair: tuple[Upstream, Upstream]) -> None:
    """Two clients take both of math's slots with 13 MB streams and never read: within slow_reader_s (1 s) plus
    the time to fill the buffers their slots are free again and others are served (was: 429 while they stay)."""
    math, general = pair
    math.control("big", chunks=200, size=65536)
    cfg = _config(math, general, max_concurrency=2)
    cfg["server"] = {"slow_reader_s": 1.0}
    with run_gateway(cfg, router=KeywordRouter()) as url, contextlib.ExitStack() as hogs:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(2):
            hogs.callback(_never_reading_client(port).close)
        poll(lambda: math.stats()["requests"] >= 2, 5, "both hogs reached the expert")
        math.control("ok")

        def served() -> bool:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=10,
                           json={"model": "math", "messages": MATH, "max_tokens": 3})
            assert r.status_code in (200, 429), r.text
            return r.status_code == 200

        started = time.monotonic()
        poll(served, 8, "a request served while the hogs still hold their connections", interval_s=0.2)
        assert time.monotonic() - started < 8
