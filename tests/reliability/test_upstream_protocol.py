"""Upstream event streams and JSON, as real upstreams write them (any valid SSE framing) or get wrong.

A scripted upstream process on loopback writes the same answer in every framing the WHATWG HTML
event-stream format allows, and injects wrongly shaped JSON; the gateway must parse the first like the
``openai`` SDK does and turn the second into ``upstream_protocol`` errors charged to the upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config
from tests.reliability.common import assert_complete_stream, assert_error_stream, assert_openai_error, metric, scrape

PROMPT = "solve one two three"


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[str, Upstream]]:
    with scripted_upstream("math") as math:
        cfg = {"experts": [vllm_expert_config("math", math, retries=0,
                                              breaker={"failure_threshold": 1000, "reset_after_s": 1})],
               "cache": {"backend": "none"}, "auth": {"api_keys_env": None}}
        with run_gateway(cfg, router=KeywordRouter(["math"])) as url:
            yield url, math


def _ask(url: str, stream: bool, endpoint: str = "chat") -> httpx.Response:
    if endpoint == "chat":
        return httpx.post(f"{url}/v1/chat/completions", timeout=15, json={
            "model": "math", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})
    return httpx.post(f"{url}/v1/completions", timeout=15, json={"model": "math", "stream": stream, "prompt": PROMPT})


FRAMINGS = [["crlf"], ["cr"], ["comments"], ["nospace"], ["multiline"], ["fields"], ["bom"],
            ["crlf", "comments", "nospace", "multiline", "fields", "bom"]]


@pytest.mark.parametrize("framing", FRAMINGS, ids=["+".join(f) for f in FRAMINGS])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_valid_sse_framing_streams_the_same_answer(gateway: tuple[str, Upstream], framing: list[str],
                                                        endpoint: str) -> None:
    """CRLF or CR line ends, comments, ``data:`` without its space, data split over lines, event/id/retry
    fields: the same answer, and nothing counted against the expert (CRLF used to give 502 and a failure)."""
    url, math = gateway
    math.control("ok", framing=framing)
    try:
        before = metric(scrape(url), "octoroute_upstream_errors_total", expert="math")
        r = _ask(url, stream=True, endpoint=endpoint)
        assert r.status_code == 200, r.text
        assert assert_complete_stream(r.text) == f"math: {PROMPT}"
        assert metric(scrape(url), "octoroute_upstream_errors_total", expert="math") == before
    finally:
        math.control("ok")


USAGE_CHUNK = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "math", "choices": []}
WRONG = {
    "a number": "5",
    "an array": "[]",
    "null": "null",
    "a string": '"hello"',
    "not json": "{oops",
    "choices a string": orjson.dumps({**USAGE_CHUNK, "choices": "hi"}).decode(),
    "choice not an object": orjson.dumps({**USAGE_CHUNK, "choices": [7]}).decode(),
    "negative index": orjson.dumps({**USAGE_CHUNK, "choices": [{"index": -1, "delta": {}}]}).decode(),
    "content a number": orjson.dumps({**USAGE_CHUNK, "choices": [{"index": 0, "delta": {"content": 5}}]}).decode(),
    "negative token count": orjson.dumps(
        {**USAGE_CHUNK, "usage": {"prompt_tokens": -3, "completion_tokens": 2, "total_tokens": -1}}).decode(),
    "token count a string": orjson.dumps(
        {**USAGE_CHUNK, "usage": {"prompt_tokens": "7", "completion_tokens": 2, "total_tokens": 9}}).decode(),
}


@pytest.mark.parametrize("after", [1, 0], ids=["mid-stream", "first-event"])
@pytest.mark.parametrize("wrong", list(WRONG), ids=list(WRONG))
def test_wrong_shaped_stream_events_are_upstream_protocol_errors(gateway: tuple[str, Upstream], wrong: str,
                                                                 after: int) -> None:
    """Mid-stream: an SSE error event ``upstream_protocol`` (was: the stream cut without a word, counted as the
    client leaving, 499). As the first event: a 502 ``upstream_protocol``. Both charged to the expert."""
    url, math = gateway
    math.control("inject", after=after, payload=WRONG[wrong])
    try:
        text = scrape(url)
        errors, bad = (metric(text, "octoroute_upstream_errors_total", expert="math", kind="protocol"),
                       metric(text, "octoroute_requests_total", expert="math", status="502"))
        r = _ask(url, stream=True)
        if after:
            assert r.status_code == 200
            err = assert_error_stream(r.text)
        else:
            assert r.status_code == 502, r.text
            err = assert_openai_error(r.json())
        assert err["code"] == "upstream_protocol" and err["type"] == "server_error", err
        text = scrape(url)
        assert metric(text, "octoroute_upstream_errors_total", expert="math", kind="protocol") == errors + 1
        assert metric(text, "octoroute_requests_total", expert="math", status="502") == bad + 1
        assert metric(text, "octoroute_requests_total", expert="math", status="499") == 0
    finally:
        math.control("ok")


RESPONSE = {"id": "x", "object": "chat.completion", "created": 1, "model": "math"}
WRONG_BODIES = {
    "a number": "5",
    "an array": "[]",
    "no choices": orjson.dumps(RESPONSE).decode(),
    "choices a string": orjson.dumps({**RESPONSE, "choices": "hi"}).decode(),
    "message missing": orjson.dumps({**RESPONSE, "choices": [{"index": 0, "finish_reason": "stop"}]}).decode(),
    "negative token count": orjson.dumps({**RESPONSE, "choices": [], "usage": {
        "prompt_tokens": 1, "completion_tokens": -5, "total_tokens": -4}}).decode(),
}


@pytest.mark.parametrize("wrong", list(WRONG_BODIES), ids=list(WRONG_BODIES))
def test_wrong_shaped_responses_are_502_upstream_protocol(gateway: tuple[str, Upstream], wrong: str) -> None:
    """A non-streamed answer of the wrong shape: 502 ``upstream_protocol``, never a gateway 500 or a 200
    carrying it."""
    url, math = gateway
    math.control("inject", payload=WRONG_BODIES[wrong])
    try:
        r = _ask(url, stream=False)
        assert r.status_code == 502, r.text
        err: dict[str, Any] = assert_openai_error(r.json())
        assert err["code"] == "upstream_protocol" and "expert math" in err["message"], err
    finally:
        math.control("ok")


@pytest.mark.parametrize("stream", [True, False], ids=["one endless event", "a huge body"])
def test_an_upstream_cannot_make_the_gateway_hold_unbounded_data(gateway: tuple[str, Upstream], stream: bool) -> None:
    """17 MiB of SSE data with no event end (the bound is 16 MiB), or a 65 MiB body (bound 64 MiB): an
    ``upstream_protocol`` error instead of buffering whatever the upstream sends."""
    url, math = gateway
    math.control("inject", after=1, payload="x" * 1024, repeat=(17 if stream else 65) * 1024)
    try:
        r = _ask(url, stream=stream)
        err = assert_error_stream(r.text) if stream else assert_openai_error(r.json())
        assert err["code"] == "upstream_protocol" and "MiB" in err["message"], err
        assert stream or r.status_code == 502
    finally:
        math.control("ok")
