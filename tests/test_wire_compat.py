"""Wire compatibility: every documented OpenAI request field is accepted, field by field, and forwarded or
dropped as ``gateway/endpoints/openai_fields.py`` says; Content-Encoding; HEAD; trailing slashes; CORS;
the key headers (issue 17 #1, #6, #7, #8)."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import httpx
import pytest

from gateway.endpoints.chat_completions.protocol import ChatCompletionRequest, ChatMessage, ContentPart
from gateway.endpoints.common import StreamOptions
from gateway.endpoints.completions.protocol import CompletionRequest
from gateway.endpoints.openai_fields import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    CONTENT_PART_TYPES,
    FORWARD,
    MESSAGE_FIELDS,
    STREAM_OPTIONS_FIELDS,
)
from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config

MSG = [{"role": "user", "content": "hello"}]

# A documented value for every field (what an SDK or framework sends).
CHAT_SAMPLES: dict[str, Any] = {
    "model": "general", "messages": MSG, "max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "n": 1,
    "stream": False, "stream_options": {"include_usage": True}, "stop": ["\n\n"], "seed": 7, "presence_penalty": 0.1,
    "frequency_penalty": 0.1, "logit_bias": {"50256": -100}, "user": "user-1", "top_k": 5, "min_p": 0.05,
    "repetition_penalty": 1.1, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2,
    "response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto", "parallel_tool_calls": False, "reasoning_effort": "low", "store": False,
    "metadata": {"run": "1"}, "service_tier": "auto", "safety_identifier": "hash-1", "prompt_cache_key": "k",
    "prompt_cache_retention": "24h", "prediction": {"type": "content", "content": "hello"}, "verbosity": "low",
    "web_search_options": {}, "modalities": ["text"], "audio": None, "functions": None, "function_call": None,
}
COMPLETION_SAMPLES: dict[str, Any] = {
    **{k: v for k, v in CHAT_SAMPLES.items() if k in COMPLETION_FIELDS}, "prompt": "hello", "best_of": 1,
    "echo": False, "logprobs": 1, "suffix": "!",
}
# Fields that only mean something beside another one.
COMPANIONS: dict[str, dict[str, Any]] = {"top_logprobs": {"logprobs": True}, "stream_options": {"stream": True}}
# What the openai SDK's ``message.model_dump()`` gives for an assistant message, replayed as history.
SDK_ASSISTANT = {"role": "assistant", "content": "hi", "refusal": None, "audio": None, "annotations": [],
                 "function_call": None, "tool_calls": None}


def test_the_table_and_the_models_name_the_same_fields() -> None:
    """One list, with its source: the request models accept exactly the fields of openai_fields."""
    assert set(ChatCompletionRequest.model_fields) == set(CHAT_FIELDS)
    assert set(CompletionRequest.model_fields) == set(COMPLETION_FIELDS)
    assert set(ChatMessage.model_fields) == set(MESSAGE_FIELDS)
    assert set(StreamOptions.model_fields) == set(STREAM_OPTIONS_FIELDS)
    assert set(ContentPart.model_fields["type"].annotation.__args__) == set(CONTENT_PART_TYPES)  # type: ignore
    assert set(CHAT_SAMPLES) == set(CHAT_FIELDS) and set(COMPLETION_SAMPLES) == set(COMPLETION_FIELDS)


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[str, Upstream]]:
    with scripted_upstream("general") as up:
        config = {"experts": [vllm_expert_config("general", up)], "cache": {"backend": "none"},
                  "server": {"max_body_bytes": 100_000}, "cors": {"allow_origins": ["https://app.example"]}}
        with run_gateway(config, router=KeywordRouter(["general"])) as url:
            yield url, up


def _forwarded_or_dropped(up: Upstream, table: dict[str, Any], field: str, value: Any) -> None:
    sent = up.stats()["last_body"]
    if table[field] == FORWARD and value is not None and field not in ("model", "stream_options"):
        assert sent[field] == value, f"{field} was not forwarded"
    elif table[field] != FORWARD:
        assert field not in sent, f"{field} reached the expert"


@pytest.mark.parametrize("field", sorted(CHAT_FIELDS))
def test_every_chat_field_is_accepted(setup: tuple[str, Upstream], field: str) -> None:
    url, up = setup
    body = {"model": "general", "messages": MSG, **COMPANIONS.get(field, {}), field: CHAT_SAMPLES[field]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    _forwarded_or_dropped(up, CHAT_FIELDS, field, CHAT_SAMPLES[field])


@pytest.mark.parametrize("field", sorted(COMPLETION_FIELDS))
def test_every_completions_field_is_accepted(setup: tuple[str, Upstream], field: str) -> None:
    url, up = setup
    body = {"model": "general", "prompt": "hello", **COMPANIONS.get(field, {}), field: COMPLETION_SAMPLES[field]}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    _forwarded_or_dropped(up, COMPLETION_FIELDS, field, COMPLETION_SAMPLES[field])


def test_replayed_sdk_history_and_agents_sdk_defaults(setup: tuple[str, Upstream]) -> None:
    """The examples of issue 17 #1: ``refusal: null`` in history, ``store``/``metadata`` from the Agents SDK,
    message ``name``, ``stream_options.include_obfuscation``; platform-only fields stay out of the body."""
    url, up = setup
    body = {"model": "general", "messages": [{"role": "user", "content": "hello", "name": "ann"}, SDK_ASSISTANT,
                                             {"role": "user", "content": [{"type": "text", "text": "again"}]}],
            "store": False, "metadata": {"run": "1"}, "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False}}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]"), r.text
    sent = up.stats()["last_body"]
    assert sent["messages"][0] == {"role": "user", "content": "hello", "name": "ann"}
    assert sent["messages"][1] == {"role": "assistant", "content": "hi"}
    assert "store" not in sent and "metadata" not in sent
    assert "include_obfuscation" not in sent["stream_options"]


def test_unknown_fields_are_still_refused(setup: tuple[str, Upstream]) -> None:
    url, _ = setup
    for body in ({"model": "general", "messages": MSG, "temprature": 0.1},
                 {"model": "general", "messages": [{**MSG[0], "refusals": None}]},
                 {"model": "general", "messages": MSG, "stream": True, "stream_options": {"usage": True}}):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 400 and "Unrecognized request argument" in r.json()["error"]["message"], r.text


# -- Content-Encoding ------------------------------------------------------------------------------------

def _encoded(url: str, payload: bytes, encoding: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=payload, timeout=10,
                      headers={"content-type": "application/json", "content-encoding": encoding})


BODY = b'{"model": "general", "messages": [{"role": "user", "content": "compressed"}]}'


@pytest.mark.parametrize(("encoding", "encode"), [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress),
    ("identity", lambda b: b), ("gzip, br", lambda b: brotli.compress(gzip.compress(b))), ("GZIP", gzip.compress),
    ("gzip", lambda b: gzip.compress(b[:20]) + gzip.compress(b[20:]))])
def test_encoded_bodies_are_decoded(setup: tuple[str, Upstream], encoding: str, encode: Any) -> None:
    url, up = setup
    r = _encoded(url, encode(BODY), encoding)
    assert r.status_code == 200, r.text
    assert up.stats()["last_body"]["messages"][0]["content"] == "compressed"


@pytest.mark.parametrize(("encoding", "payload", "status"), [
    ("br", BODY, 400), ("gzip", BODY, 400), ("deflate", BODY, 400), ("gzip", gzip.compress(BODY)[:-12], 400),
    ("deflate", zlib.compress(BODY) + b"trailing", 400), ("gzip", gzip.compress(BODY) + b"trailing", 400),
    ("compress", BODY, 415), ("zstd", BODY, 415), ("gzip, snappy", BODY, 415),
    ("gzip", gzip.compress(b" " * 5_000_000), 413), ("br", brotli.compress(b" " * 5_000_000), 413),
    ("deflate", zlib.compress(b" " * 5_000_000), 413)])
def test_bad_or_unsupported_encodings_are_refused(setup: tuple[str, Upstream], encoding: str, payload: bytes,
                                                  status: int) -> None:
    """A plain body labelled ``br`` was served (issue 17 #6); an encoding the gateway cannot read is a 415; a
    small body that decodes past ``server.max_body_bytes`` is a 413."""
    url, up = setup
    before = up.stats()["requests"]
    r = _encoded(url, payload, encoding)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert up.stats()["requests"] == before


# -- HTTP conventions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/health", "/ready", "/v1/models", "/v1/models/general", "/metrics",
                                  "/openapi.json"])
def test_head_on_every_get_endpoint(setup: tuple[str, Upstream], path: str) -> None:
    url, _ = setup
    get, head = httpx.get(f"{url}{path}"), httpx.head(f"{url}{path}")
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/chat/completions/"), ("POST", "/v1/completions/"),
                                              ("POST", "/v1/route/"), ("GET", "/v1/models/"), ("GET", "/health/")])
def test_trailing_slash_is_served_not_redirected(setup: tuple[str, Upstream], method: str, path: str) -> None:
    url, _ = setup
    body: dict[str, Any] = {"/v1/completions/": {"model": "general", "prompt": "hi"}, "/v1/route/": {
        "messages": MSG}}.get(path, {"model": "general", "messages": MSG})
    r = httpx.request(method, f"{url}{path}", json=body if method == "POST" else None,
                      headers={"host": "evil.example"}, timeout=10)
    assert r.status_code == 200, (path, r.status_code, r.headers.get("location"))


def test_cors_preflight_and_headers_when_configured(setup: tuple[str, Upstream]) -> None:
    url, _ = setup
    pre = httpx.options(f"{url}/v1/chat/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-os"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "general", "messages": MSG},
                   headers={"origin": "https://app.example"}, timeout=10)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-octoroute-expert" in r.headers["access-control-expose-headers"]
    other = httpx.options(f"{url}/v1/chat/completions", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default() -> None:
    with scripted_upstream("general") as up, run_gateway(
            {"experts": [vllm_expert_config("general", up)], "cache": {"backend": "none"},
             "auth": {"api_keys": ["k1"], "api_keys_env": None}}, router=KeywordRouter(["general"])) as url:
        pre = httpx.options(f"{url}/v1/chat/completions", headers={
            "origin": "https://app.example", "access-control-request-method": "POST"})
        assert not any(h.startswith("access-control-") for h in pre.headers)
        _key_headers(url)


# -- which headers carry the key ---------------------------------------------------------------------------

def _key_headers(url: str) -> None:
    """Authorization: Bearer, api-key (Azure) and x-api-key all work; a 401 says which, with WWW-Authenticate."""
    def chat(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json={"model": "general", "messages": MSG},
                          headers=headers, timeout=10)

    for ok in ({"authorization": "Bearer k1"}, {"api-key": "k1"}, {"x-api-key": "k1"},
               {"authorization": "Basic zzz", "api-key": "k1"}):
        assert chat(ok).status_code == 200, ok
    for bad in ({}, {"authorization": "k1"}, {"api-key": ""}):
        r = chat(bad)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), bad
        message = r.json()["error"]["message"]
        assert "Authorization: Bearer" in message and "api-key" in message and "x-api-key" in message
    for wrong in ({"authorization": "Bearer nope"}, {"api-key": "nope"}, {"x-api-key": "nope"}):
        r = chat(wrong)
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"], wrong
    # Open by default (probes and scrapers): protect_ops turns that off, see test_ops_endpoints_protected.
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_ops_endpoints_protected_when_configured() -> None:
    with scripted_upstream("general") as up, run_gateway(
            {"experts": [vllm_expert_config("general", up)], "cache": {"backend": "none"},
             "auth": {"api_keys": ["k1"], "api_keys_env": None, "protect_ops": True}},
            router=KeywordRouter(["general"])) as url:
        for path in ("/metrics", "/ready", "/docs", "/openapi.json", "/redoc", "/metrics/"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
            assert httpx.get(f"{url}{path}", headers={"api-key": "k1"}).status_code == 200, path
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.head(f"{url}/metrics").status_code == 401
