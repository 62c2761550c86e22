"""The circuit breaker charges the expert, never the client, and a half-open probe decides fast.

Scripted upstream processes on loopback (and one in-process expert that raises) behind a real gateway.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import GatewayConfig
from gateway.experts import Expert
from gateway.experts.base import JSON, Endpoint
from gateway.experts.vllm import VllmExpert
from router_model import KeywordRouter
from tests.harness import Upstream, free_port, run_gateway, scripted_upstream, vllm_expert_config
from tests.reliability.common import assert_complete_stream, assert_openai_error, metric, poll, scrape

MATH = [{"role": "user", "content": "solve one two three four five six seven eight nine ten"}]


@pytest.fixture
def pair() -> Iterator[tuple[Upstream, Upstream]]:
    with scripted_upstream("math") as math, scripted_upstream("general") as general:
        yield math, general


def _ask(url: str, model: str = "math", stream: bool = False, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=15,
                      json={"model": model, "messages": MATH, "stream": stream, **extra})


@pytest.mark.parametrize("probe_client", ["reads", "never reads", "non-streamed"])
def test_half_open_breaker_closes_on_the_probes_first_byte(pair: tuple[Upstream, Upstream], probe_client: str) -> None:
    """The probe is a healthy 5 s answer: the breaker closes at its first chunk (or, non-streamed, its response
    headers), so requests made while it is still running are served (was: 503 until the probe's answer ended,
    or until a non-reading client left)."""
    math, general = pair
    cfg = {"experts": [vllm_expert_config("math", math, retries=0, breaker={"failure_threshold": 1,
                                                                          "reset_after_s": 0.5}),
                       vllm_expert_config("general", general)],
           "default_expert": "general", "cache": {"backend": "none"}, "auth": {"api_keys_env": None}}
    with run_gateway(cfg, router=KeywordRouter()) as url:
        math.control("fail", status=500, fail_times=1)
        assert _ask(url).status_code == 502
        assert metric(scrape(url), "octoroute_breaker_open", expert="math") == 1
        time.sleep(0.6)  # reset_after_s: the next request is the probe
        math.control("slow_body" if probe_client == "non-streamed" else "slow_chunks", delay_s=5 if
                     probe_client == "non-streamed" else 0.5)
        done = threading.Event()
        if probe_client == "non-streamed":  # its headers come at once, its body after 5 s
            def probe_json() -> None:
                assert _ask(url).status_code == 200
                done.set()
            threading.Thread(target=probe_json, daemon=True).start()
        elif probe_client == "reads":
            def probe() -> None:
                assert_complete_stream(_ask(url, stream=True).text)
                done.set()
            threading.Thread(target=probe, daemon=True).start()
        else:
            sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            body = orjson.dumps({"model": "math", "messages": MATH, "stream": True})
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        poll(lambda: math.stats()["requests"] >= 2, 5, "the probe reached the expert")
        math.control("ok")
        poll(lambda: metric(scrape(url), "octoroute_breaker_open", expert="math") == 0, 2,
             "the breaker closed on the probe's first byte")
        assert [_ask(url).status_code for _ in range(5)] == [200] * 5
        assert not done.is_set(), "the probe's stream should still be running"
        if probe_client == "never reads":
            sock.close()


class Exploding(Expert):
    """An in-process expert whose generation raises an internal error carrying a secret."""

    unsupported = frozenset()

    def __init__(self, name: str) -> None:
        self.name = self.served_model = name

    async def generate(self, endpoint: Endpoint, body: JSON, on_first_byte: Callable[[], None] | None = None) -> JSON:
        raise RuntimeError("CUDA-ish internals: tensor at 0xdeadbeef, secret=hunter2")

    async def stream(self, endpoint: Endpoint, body: JSON) -> AsyncIterator[JSON]:
        raise RuntimeError("CUDA-ish internals: tensor at 0xdeadbeef, secret=hunter2")
        yield {}

    async def healthy(self) -> bool:
        return True


def test_errors_caused_by_requests_never_open_the_breaker_and_never_leak(
        pair: tuple[Upstream, Upstream], caplog: pytest.LogCaptureFixture) -> None:
    """Five requests that fail inside an in-process expert (raw exception) and five upstream 400s: no breaker
    opens, the fallback keeps answering, and the exception's text only reaches the log, with the request id."""
    math, general = pair
    cfg = {"experts": [{"name": "local", "backend": "local", "path": "/nonexistent", "breaker": {
        "failure_threshold": 5, "reset_after_s": 30}}, vllm_expert_config("math", math, retries=0),
        vllm_expert_config("general", general)],
        "default_expert": "general", "fallback_expert": "general", "cache": {"backend": "none"},
        "auth": {"api_keys_env": None}}
    experts: dict[str, Expert] = {"local": Exploding("local")}
    config = GatewayConfig.model_validate(cfg)
    experts |= {e.name: VllmExpert(e) for e in config.experts if e.backend == "vllm"}
    with caplog.at_level(logging.ERROR), run_gateway(config, router=KeywordRouter(), experts=experts) as url:
        request_ids = []
        for i in range(5):
            for stream in (False, True):
                r = _ask(url, model="local", stream=stream, seed=i)
                assert r.status_code == 500, r.text
                err = assert_openai_error(r.json())
                assert "hunter2" not in r.text and "0xdeadbeef" not in r.text and "RuntimeError" not in r.text
                assert err["type"] == "server_error" and "x-request-id" in err["message"], err
                request_ids.append(r.headers["x-request-id"])
        math.control("fail", status=400)
        for _ in range(5):
            r = _ask(url)
            assert r.status_code == 400 and assert_openai_error(r.json())["message"] == "scripted 400"
        math.control("ok")
        text = scrape(url)
        assert metric(text, "octoroute_breaker_open", expert="local") == 0
        assert metric(text, "octoroute_breaker_open", expert="math") == 0
        assert _ask(url, model="local").status_code == 500  # still the expert's own answer, not a 503
        assert _ask(url).status_code == 200
    logged = {getattr(r, "request_id", None) for r in caplog.records
              if r.exc_info and "hunter2" in str(r.exc_info[1])}
    assert set(request_ids) <= logged, "every internal error is logged, with its request id and the cause"


@pytest.mark.parametrize(("base_url", "kind", "words"), [
    ("http://no-such-expert.invalid:8000/v1", "connect_dns", "does not resolve (DNS)"),
    ("http://127.0.0.1:{port}/v1", "connect_refused", "connection refused"),
])
def test_unreachable_expert_names_the_real_cause(base_url: str, kind: str, words: str) -> None:
    """DNS failure and a refused connection are told apart in the error and in the metric's ``kind`` label (a
    fixed set); was ``ConnectTimeout(... Name or service not known)`` for both."""
    cfg = {"experts": [{"name": "math", "backend": "vllm", "base_url": base_url.format(port=free_port()),
                        "retries": 0}],
           "cache": {"backend": "none"}, "auth": {"api_keys_env": None}}
    with run_gateway(cfg, router=KeywordRouter(["math"])) as url:
        r = _ask(url)
        assert r.status_code == 502
        err = assert_openai_error(r.json())
        assert words in err["message"] and "ConnectTimeout" not in err["message"], err
        assert err["code"] == "upstream_connect"
        assert metric(scrape(url), "octoroute_upstream_errors_total", expert="math", kind=kind) == 1


def test_bad_requests_in_between_do_not_keep_a_failing_expert_in_service(pair: tuple[Upstream, Upstream]) -> None:
    """Threshold 2: expert fault, a client's 400, expert fault -> open. A 4xx is the request's, no verdict on the
    expert either way (it used to count as a success and reset the count, so bad requests kept it closed)."""
    math, general = pair
    cfg = {"experts": [vllm_expert_config("math", math, retries=0, breaker={"failure_threshold": 2,
                                                                          "reset_after_s": 30}),
                       vllm_expert_config("general", general)],
           "default_expert": "general", "cache": {"backend": "none"}, "auth": {"api_keys_env": None}}
    with run_gateway(cfg, router=KeywordRouter()) as url:
        for status in (500, 400, 500):
            math.control("fail", status=status)
            assert _ask(url).status_code == (502 if status == 500 else 400)
        assert metric(scrape(url), "octoroute_breaker_open", expert="math") == 1
        r = _ask(url)
        assert r.status_code == 503 and assert_openai_error(r.json())["code"] == "service_unavailable"
