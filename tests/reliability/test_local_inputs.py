"""In-process (local) experts behind the gateway: bad input is the client's 400, never a breaker failure,
and what they stream carries only what the client asked to see.

The demo experts (built once per machine) as ``general`` (also the fallback, as in the embedded default)
and ``math``, both local; fusion between them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from router_model import KeywordRouter
from tests.harness import run_gateway
from tests.reliability.common import assert_complete_stream, assert_openai_error, metric, scrape


@pytest.fixture(scope="module")
def gateway(demo_experts_dir: Path) -> Iterator[str]:
    cfg = {"experts": [{"name": n, "backend": "local", "path": str(demo_experts_dir / n), "max_concurrency": 8}
                       for n in ("general", "math")],
           "default_expert": "general", "fallback_expert": "general", "cache": {"backend": "none"},
           "auth": {"api_keys_env": None}}
    with run_gateway(cfg, router=KeywordRouter()) as url:
        yield url


BAD = [  # (endpoint, body, the field the 400 must name)
    ("completions", {"prompt": "", "max_tokens": 3}, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": 3, "seed": 2**64}, "seed"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": -(2**63) - 1}, "seed"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD, ids=["empty prompt", "seed too big", "seed too small"])
def test_bad_input_is_a_400_naming_the_field_and_never_opens_the_breaker(gateway: str, endpoint: str,
                                                                        body: dict[str, Any], param: str) -> None:
    """Five times the same bad request to ``general`` (the fallback): each a 400 naming the field, with no
    torch text; the breaker stays closed, so everyone else is still served (was: 500 with a raw torch error,
    and after five of them every request 503 for 15 s)."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    for _ in range(5):
        r = httpx.post(f"{gateway}{path}", timeout=30, json={"model": "general", **body})
        assert r.status_code == 400, r.text
        err = assert_openai_error(r.json())
        assert err["param"] == param and "torch" not in err["message"].lower(), err
    assert metric(scrape(gateway), "octoroute_breaker_open", expert="general") == 0
    ok = httpx.post(f"{gateway}/v1/chat/completions", timeout=60,
                    json={"model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
    assert ok.status_code == 200, ok.text


def test_a_near_zero_temperature_decodes_greedily_instead_of_failing(gateway: str) -> None:
    body = {"model": "general", "prompt": "The sky is", "max_tokens": 4}
    tiny = httpx.post(f"{gateway}/v1/completions", timeout=60, json={**body, "temperature": 1e-30})
    greedy = httpx.post(f"{gateway}/v1/completions", timeout=60, json={**body, "temperature": 0})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("model", ["general", "fusion"])
def test_streamed_chunks_carry_usage_only_when_asked(gateway: str, model: str) -> None:
    """Without ``stream_options.include_usage`` no chunk has a ``usage`` key (was ``"usage": null`` on every
    chunk from local experts); with it, the last chunk has the counts (and the others ``null``, as OpenAI)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Add two and two"}], "max_tokens": 4,
            "stream": True}
    plain = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json=body)
    assert_complete_stream(plain.text)
    chunks = [orjson.loads(line[6:]) for line in plain.text.split("\n") if line.startswith("data: {")]
    assert chunks and not [c for c in chunks if "usage" in c or "octoroute_fusion" in c]
    asked = httpx.post(f"{gateway}/v1/chat/completions", timeout=60,
                       json={**body, "stream_options": {"include_usage": True}})
    chunks = [orjson.loads(line[6:]) for line in asked.text.split("\n") if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-1]["choices"] == []
    assert not [c for c in chunks if "octoroute_fusion" in c]


def test_fused_answers_carry_only_openai_fields(gateway: str) -> None:
    """A fused non-streamed answer had ``"octoroute_fusion": null``; which experts were fused is a header."""
    r = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json={
        "model": "fusion", "messages": [{"role": "user", "content": "Add two and two"}], "max_tokens": 4})
    assert r.status_code == 200 and r.headers["x-octoroute-expert"] == "fusion", r.text
    assert set(r.json()) == {"id", "object", "created", "model", "choices", "usage"}
    assert r.headers["x-octoroute-fused"]
