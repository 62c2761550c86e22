"""Bad input is refused at the edge with an OpenAI-shaped 4xx, and never reaches an expert."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[str, Upstream]]:
    with scripted_upstream("general") as up:
        config = {"experts": [vllm_expert_config("general", up)], "cache": {"backend": "none"},
                  "server": {"max_body_bytes": 100_000, "max_messages": 50, "max_tokens_limit": 4096}}
        with run_gateway(config, router=KeywordRouter(["general"])) as url:
            yield url, up


def _post(url: str, content: bytes | None = None, json: Any = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=content, json=json,
                      headers={"content-type": "application/json"}, timeout=10)


def _assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return dict(err)


CASES: list[tuple[str, bytes | None, Any, int, str | None]] = [
    ("invalid json", b"{not json", None, 400, None),
    ("invalid utf-8", b'{"model": "auto", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None, 400, None),
    ("empty body", b"", None, 400, None),
    ("not an object", b"[1, 2]", None, 400, None),
    ("missing messages", None, {"model": "auto"}, 400, "messages"),
    ("missing model", None, {"messages": MSG}, 400, "model"),
    ("wrong type", None, {"model": "auto", "messages": "hi"}, 400, "messages"),
    ("temperature too high", None, {"model": "auto", "messages": MSG, "temperature": 5}, 400, "temperature"),
    ("negative top_p", None, {"model": "auto", "messages": MSG, "top_p": -0.5}, 400, "top_p"),
    ("NaN temperature", b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     None, 400, None),
    ("n over the cap", None, {"model": "auto", "messages": MSG, "n": 17}, 400, "n"),
    ("huge max_tokens", None, {"model": "auto", "messages": MSG, "max_tokens": 10**9}, 400, "max_tokens"),
    ("zero max_tokens", None, {"model": "auto", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("unknown field", None, {"model": "auto", "messages": MSG, "frobnicate": 1}, 400, "frobnicate"),
    ("bad role", None, {"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("content of the wrong type", None, {"model": "auto", "messages": [*MSG, {"role": "assistant", "content": 5}]},
     400, "messages[1].content"),
    ("content part of the wrong type", None,
     {"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     400, "messages[0].content[0].text"),
    ("unknown message field", None, {"model": "auto", "messages": [{"role": "user", "content": "x", "mood": 1}]},
     400, "messages[0].mood"),
    ("missing role", None, {"model": "auto", "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("image part on text-only experts", None, {"model": "auto", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     400, "messages[0].content[0]"),
    ("audio output", None, {"model": "auto", "messages": MSG, "modalities": ["text", "audio"]}, 400, "modalities"),
    ("deprecated functions", None, {"model": "auto", "messages": MSG, "functions": [{"name": "f"}]}, 400,
     "functions"),
    ("logit_bias key not a token id", None, {"model": "auto", "messages": MSG, "logit_bias": {"hello": 1}}, 400,
     "logit_bias"),
    ("seed past 64 bits", None, {"model": "auto", "messages": MSG, "seed": 2**64}, 400, "seed"),
    ("top_logprobs without logprobs", None, {"model": "auto", "messages": MSG, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("stop list too long", None, {"model": "auto", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("too many messages", None, {"model": "auto", "messages": MSG * 51}, 400, "messages"),
    ("stream_options without stream", None,
     {"model": "auto", "messages": MSG, "stream_options": {"include_usage": True}}, 400, None),
    ("unknown model", None, {"model": "nope", "messages": MSG}, 404, "model"),
]


@pytest.mark.parametrize(("content", "payload", "status", "param"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_refused(setup: tuple[str, Upstream], content: bytes | None, payload: Any, status: int,
                           param: str | None) -> None:
    url, up = setup
    before = up.stats()["requests"]
    _assert_openai_error(_post(url, content, payload), status, param)
    assert up.stats()["requests"] == before, "a refused request reached the expert"


def test_body_over_limit_is_413(setup: tuple[str, Upstream]) -> None:
    url, _ = setup
    big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 200_000}]}
    err = _assert_openai_error(_post(url, json=big), 413)
    assert err["code"] == "request_too_large"


def test_chunked_body_over_limit_is_413(setup: tuple[str, Upstream]) -> None:
    url, _ = setup

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 10_000
        yield b'"}]}'

    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    _assert_openai_error(r, 413)


@pytest.mark.parametrize("prompt", ["", [""], [], [[]], ["a", "b"], [[1], [2]], [-1], 5, None])
def test_completions_refuses_bad_prompts_at_the_edge(setup: tuple[str, Upstream], prompt: Any) -> None:
    """An empty prompt was a 500 with a raw torch error from the local expert (issue 17 #2): every prompt the
    experts cannot take is a 400 naming ``prompt``, and none reaches an expert."""
    url, up = setup
    before = up.stats()["requests"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "general", "prompt": prompt, "max_tokens": 3})
    err = _assert_openai_error(r, 400)
    assert err["param"] is not None and err["param"].startswith("prompt"), err
    assert up.stats()["requests"] == before


def test_validation_messages_use_the_api_terms(setup: tuple[str, Upstream]) -> None:
    """param is the API's field path and the message a sentence, never pydantic's (issue 17 #9)."""
    url, _ = setup
    bodies = [
        {"model": "auto", "messages": [*MSG, {"role": "assistant", "content": 5}]},
        {"model": "auto", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {"model": "auto", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
        {"model": "auto", "messages": MSG, "temperature": "0.5"},
        {"model": "auto", "messages": MSG, "tool_choice": 5},
        {"model": "auto", "messages": MSG, "stop": 5},
        {"model": "auto", "messages": [{"role": "tool"}], "n": 0},
        {"model": 5, "messages": MSG},
    ]
    for body in bodies:
        err = _assert_openai_error(_post(url, json=body), 400)
        text = f"{err['message']} {err['param']}"
        for internal in ("Input should", "str", "list[", "function-after", "validation", "tagged-union",
                         "constrained", "dict[", "_type", "[key]"):
            assert internal not in text.replace("string", "S"), (body, err)
        assert (err["param"] and "." not in err["param"].split("[")[0]) or err["param"].startswith("messages"), err
        assert err["param"] in err["message"], err


def test_a_conversation_of_one_system_message_is_served(setup: tuple[str, Upstream]) -> None:
    """OpenAI and vLLM accept it (issue 17 #10); so do chat completions and /v1/route here."""
    url, up = setup
    system_only = [{"role": "system", "content": "You are terse."}]
    r = _post(url, json={"model": "general", "messages": system_only})
    assert r.status_code == 200, r.text
    assert up.stats()["last_body"]["messages"] == system_only
    assert httpx.post(f"{url}/v1/route", json={"messages": system_only}).status_code == 200


def test_completions_refuses_batched_prompts(setup: tuple[str, Upstream]) -> None:
    url, _ = setup
    r = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": ["a", "b"]})
    err = _assert_openai_error(r, 400, "prompt")
    assert "batched prompts" in err["message"]


def test_wrong_method_is_openai_shaped(setup: tuple[str, Upstream]) -> None:
    url, _ = setup
    _assert_openai_error(httpx.get(f"{url}/v1/chat/completions"), 405)


def test_valid_request_passes_sampling_fields_through(setup: tuple[str, Upstream]) -> None:
    url, up = setup
    r = _post(url, json={"model": "general", "messages": MSG, "temperature": 0.3, "top_k": 5, "seed": 7})
    assert r.status_code == 200
    sent = up.stats()["last_body"]
    assert sent["temperature"] == 0.3 and sent["top_k"] == 5 and sent["seed"] == 7
    assert sent["model"] == "general"


def test_strict_types_like_openai(setup: tuple[str, Upstream]) -> None:
    url, _ = setup
    for bad in ({"temperature": True}, {"temperature": "0.5"}, {"max_tokens": "5"}, {"stream": "yes"}):
        _assert_openai_error(_post(url, json={"model": "auto", "messages": MSG, **bad}), 400, next(iter(bad)))


def test_edge_refusals_are_counted(setup: tuple[str, Upstream]) -> None:
    url, _ = setup
    _post(url, b"{broken")
    metrics = httpx.get(f"{url}/metrics").text
    assert 'octoroute_requests_total{endpoint="chat",expert="none",model="-",status="400"}' in metrics
