"""Bad input against a live gateway: schemathesis over /openapi.json, then hand-written hostile bodies.

The contract: never a 5xx, every 4xx in OpenAI's error shape, nothing refused ever reaches an expert.
(`tests/test_gateway_input.py` has the one-field-wrong cases; this file is about fuzzing and abuse.)
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config
from tests.reliability.common import assert_openai_error

MSG = [{"role": "user", "content": "hello"}]
MAX_BODY = 4_000_000
MAX_EXAMPLES = 50


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[str, Upstream]]:
    with scripted_upstream("general") as up:
        config = {"experts": [vllm_expert_config("general", up)], "cache": {"backend": "memory"},
                  "auth": {"api_keys_env": None},
                  "server": {"max_body_bytes": MAX_BODY, "max_messages": 2048, "max_tokens_limit": 4096}}
        with run_gateway(config, router=KeywordRouter(["general"])) as url:
            yield url, up


def _check(response: Any) -> None:
    """No 5xx; a 4xx carries the OpenAI error shape."""
    status = response.status_code
    assert status < 500, f"{status}: {response.content[:500]!r}"
    if status >= 400:
        assert_openai_error(orjson.loads(response.content))


def _fuzz(operation: Any, mode: GenerationMode, url: str) -> int:
    """Run up to MAX_EXAMPLES generated requests against one operation; returns how many were sent."""
    sent = 0

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal sent
        sent += 1
        _check(case.call(base_url=url, timeout=15))

    run()
    return sent


@pytest.mark.reliability
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_no_5xx_and_openai_shaped_4xx(setup: tuple[str, Upstream], mode: GenerationMode) -> None:
    url, _ = setup
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/route", "GET /v1/models"} <= paths
    calls: dict[str, int] = {}
    for operation in operations:
        name = f"{operation.method.upper()} {operation.path}"
        if operation.path == "/metrics":
            continue  # text exposition, nothing to fuzz
        if mode == GenerationMode.NEGATIVE and operation.method.upper() in ("GET", "DELETE"):
            continue  # no body and no typed parameters: nothing can be made invalid

        calls[name] = _fuzz(operation, mode, url)
    for post in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/route"):
        assert calls.get(post, 0) >= MAX_EXAMPLES // 2, calls


# -- hand-written -------------------------------------------------------------------------------------------


def _post(url: str, content: bytes, path: str = "/v1/chat/completions", timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=timeout)


def _refused(url: str, up: Upstream, content: bytes, status: int = 400, path: str = "/v1/chat/completions",
             param: str | None = None) -> dict[str, Any]:
    before = up.stats()["requests"]
    r = _post(url, content, path)
    assert r.status_code == status, r.text[:500]
    err = assert_openai_error(r.json())
    if param is not None:
        assert err["param"] == param, err
    assert up.stats()["requests"] == before, "a refused request reached the expert"
    return err


def _body(**fields: Any) -> bytes:
    # stdlib json: it encodes nesting deeper than orjson's 254 levels, and NaN/Infinity literals
    return json.dumps({"model": "auto", "messages": MSG, **fields}).encode()


INVALID_UTF8 = {
    "lone continuation byte": b'{"model": "auto", "messages": [{"role": "user", "content": "a\x80b"}]}',
    "overlong slash": b'{"model": "auto", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',
    "encoded surrogate": b'{"model": "auto", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    "truncated sequence at end": b'{"model": "auto", "messages": [{"role": "user", "content": "\xe2\x82"}]}',
    "invalid byte in a key": b'{"mo\xffdel": "auto", "messages": [{"role": "user", "content": "x"}]}',
    "escaped lone surrogate": b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "latin-1 body": "{\"model\": \"auto\", \"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}".encode(
        "latin-1"),
}


@pytest.mark.parametrize("content", list(INVALID_UTF8.values()), ids=list(INVALID_UTF8))
def test_invalid_utf8_is_400(setup: tuple[str, Upstream], content: bytes) -> None:
    url, up = setup
    for path in ("/v1/chat/completions", "/v1/route"):
        _refused(url, up, content, path=path)


@pytest.mark.parametrize("depth", [100_000, 1_100])
def test_deeply_nested_json_is_400(setup: tuple[str, Upstream], depth: int) -> None:
    url, up = setup
    started = time.monotonic()
    _refused(url, up, b"[" * depth + b"]" * depth)
    _refused(url, up, b'{"model": "auto", "messages": ' + b"[" * depth + b"]" * depth + b"}")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("field", ["tools", "response_format", "logit_bias_nested", "tool_calls"])
def test_nesting_deeper_than_the_encoder_allows_is_400_not_500(setup: tuple[str, Upstream], field: str) -> None:
    """Parsable (orjson reads 1,024 levels) but deeper than what the gateway can re-encode (254)."""
    url, up = setup
    deep: Any = "x"
    for _ in range(600):
        deep = [deep]
    if field == "tools":
        body = _body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"a": deep}}}])
    elif field == "response_format":
        body = _body(response_format={"type": "json_schema", "json_schema": deep})
    elif field == "tool_calls":
        body = json.dumps({"model": "auto", "messages": [
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": deep}]},
            {"role": "user", "content": "go on"}]}).encode()
    else:
        body = _body(logit_bias={"1": deep})
    _refused(url, up, body)


def test_ten_megabyte_bodies_are_413(setup: tuple[str, Upstream]) -> None:
    url, up = setup
    big = b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"y" * 10_000_000 + b'"}]}'
    err = _refused(url, up, big, status=413)
    assert err["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no content-length: the limit is enforced while reading
        yield big[:100]
        for i in range(100, len(big), 1_000_000):
            yield big[i: i + 1_000_000]

    before = up.stats()["requests"]
    r = httpx.post(f"{url}/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and assert_openai_error(r.json())["code"] == "request_too_large"
    assert up.stats()["requests"] == before
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_huge_declared_content_length_is_refused_before_reading(setup: tuple[str, Upstream]) -> None:
    """A client announcing 1 TB gets its 413 at once (raw socket: httpx would correct the header)."""
    url, _ = setup
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000000000000\r\n\r\n{")
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert_openai_error(orjson.loads(head.split(b"\r\n\r\n", 1)[1]))


def test_hundred_thousand_messages_is_a_fast_400(setup: tuple[str, Upstream]) -> None:
    """Counted before 100k messages are validated one by one (0.2 s of a blocked event loop each time)."""
    url, up = setup
    chat = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": ""}] * 100_000})
    route = orjson.dumps({"messages": [{"role": "user", "content": ""}] * 100_000})
    assert len(chat) < MAX_BODY
    before = up.stats()["requests"]
    for path, body in (("/v1/chat/completions", chat), ("/v1/route", route)):
        started = time.monotonic()
        r = _post(url, body, path)
        took = time.monotonic() - started
        assert r.status_code == 400 and assert_openai_error(r.json())["param"] == "messages", r.text[:300]
        assert "Too many messages: 100000" in r.json()["error"]["message"]
        assert took < 5, f"{path}: {took:.1f}s for a 400"
    assert up.stats()["requests"] == before


SAMPLING = {
    "negative temperature": _body(temperature=-0.1),
    "negative top_p": _body(top_p=-1),
    "zero top_p": _body(top_p=0),
    "negative max_tokens": _body(max_tokens=-5),
    "negative presence_penalty": _body(presence_penalty=-2.5),
    "negative frequency_penalty": _body(frequency_penalty=-9),
    "top_k below -1": _body(top_k=-2),
    "negative min_p": _body(min_p=-0.5),
    "negative repetition_penalty": _body(repetition_penalty=-1),
    "negative top_logprobs": _body(top_logprobs=-1),
    "NaN temperature": _body()[:-1] + b', "temperature": NaN}',
    "Infinity top_p": _body()[:-1] + b', "top_p": Infinity}',
    "-Infinity penalty": _body()[:-1] + b', "presence_penalty": -Infinity}',
    "overflow to inf": _body()[:-1] + b', "temperature": 1e400}',
    "NaN as string": _body(temperature="NaN"),
    "NaN logit bias": _body()[:-1] + b', "logit_bias": {"5": NaN}}',
    "seed beyond 64 bits": _body()[:-1] + b', "seed": 123456789012345678901234567890}',
    "seed as huge float": _body(seed=1e30),
    "top_k beyond 64 bits": _body()[:-1] + b', "top_k": 1e30}',
    "string max_tokens": _body(max_tokens="ten"),
}


@pytest.mark.parametrize("content", list(SAMPLING.values()), ids=list(SAMPLING))
def test_bad_sampling_parameters_are_400(setup: tuple[str, Upstream], content: bytes) -> None:
    url, up = setup
    _refused(url, up, content)


UNKNOWN = {
    "chat top level": ("/v1/chat/completions", _body(frobnicate=1), "frobnicate"),
    "chat message": ("/v1/chat/completions", orjson.dumps(
        {"model": "auto", "messages": [{"role": "user", "content": "x", "mood": "happy"}]}), "messages[0].mood"),
    "chat content part": ("/v1/chat/completions", orjson.dumps(
        {"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "z": 1}]}]}),
        None),
    "stream_options": ("/v1/chat/completions", _body(stream=True, stream_options={"include_usage": True, "x": 1}),
                       "stream_options.x"),
    "completions top level": ("/v1/completions", orjson.dumps({"model": "auto", "prompt": "x", "best_off": 2}),
                              "best_off"),
    "route top level": ("/v1/route", orjson.dumps({"messages": MSG, "model": "auto"}), "model"),
    "null byte field name": ("/v1/chat/completions", _body(**{"a\u0000b": 1}), "a\u0000b"),
}


@pytest.mark.parametrize(("path", "content", "param"), list(UNKNOWN.values()), ids=list(UNKNOWN))
def test_unknown_fields_are_refused_like_openai(setup: tuple[str, Upstream], path: str, content: bytes,
                                                 param: str | None) -> None:
    url, up = setup
    err = _refused(url, up, content, path=path, param=param)
    assert err["type"] == "invalid_request_error"
    assert "Unrecognized request argument supplied" in err["message"] or param is None
    # Same request twice, same answer: refusal does not depend on state (cache, routing, breaker).
    again = _post(url, content, path)
    assert again.status_code == 400 and again.json() == {"error": err}


def test_gateway_still_serves_after_the_abuse(setup: tuple[str, Upstream]) -> None:
    url, _ = setup
    r = _post(url, _body(stream=True))
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
