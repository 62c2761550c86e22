"""The gateway end to end over real HTTP: the openai SDK against scripted upstream processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    with scripted_upstream("math") as math, scripted_upstream("general") as general:
        yield {"math": math, "general": general}


@pytest.fixture(scope="module")
def gateway(upstreams: dict[str, Upstream]) -> Iterator[str]:
    config = {
        "experts": [vllm_expert_config("math", upstreams["math"]),
                    vllm_expert_config("general", upstreams["general"])],
        "default_expert": "general",
        "cache": {"backend": "none"},
    }
    with run_gateway(config, router=KeywordRouter()) as url:
        yield url


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


def test_chat_routes_by_content_and_says_so(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "solve the equation x + 2 = 5"}])
    completion = raw.parse()
    assert raw.headers["x-octoroute-expert"] == "math"
    assert 0 < float(raw.headers["x-octoroute-confidence"]) <= 1
    assert float(raw.headers["x-octoroute-route-ms"]) >= 0
    assert raw.headers["x-octoroute-cache"] == "bypass"
    assert raw.headers["x-request-id"]
    assert completion.choices[0].message.content == "math: solve the equation x + 2 = 5"
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_general_query_goes_to_general(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}])
    assert raw.headers["x-octoroute-expert"] == "general"


def test_pinned_model_skips_routing(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="math", messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}])
    assert raw.headers["x-octoroute-expert"] == "math"
    assert raw.parse().choices[0].message.content.startswith("math:")


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "calculate the sum of 2 and 3"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "math: calculate the sum of 2 and 3"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]


def test_streaming_without_usage_drops_the_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="general", messages=[{"role": "user", "content": "hi there"}], stream=True))
    assert all(c.choices for c in chunks)


def test_sse_ends_with_done(gateway: str) -> None:
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json={
            "model": "general", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    result = client.completions.create(model="auto", prompt="integral of x squared", max_tokens=3)
    assert result.choices[0].text == "math: integral of"
    assert result.choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model="general", prompt="once upon", stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == "general: once upon"


async def test_async_sdk(gateway: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    result = await client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "solve for the probability of this equation"}])
    assert result.choices[0].message.content.startswith("math:")
    stream = await client.chat.completions.create(
        model="general", messages=[{"role": "user", "content": "tell me a story"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "general: tell me a story"
    await client.close()


def test_models_lists_auto_and_experts(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["auto", "math", "general"]
    for name in ids:
        assert client.models.retrieve(name).model_dump() == client.models.list().data[ids.index(name)].model_dump()
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-9")
    body: Any = info.value.body
    assert body["code"] == "model_not_found" and "auto, math, general" in body["message"]


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    body: Any = info.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert set(body) == {"message", "type", "param", "code"}


def test_conversation_context_is_routed(gateway: str) -> None:
    """The router sees the last user turn: a general follow-up after a math turn goes to general."""
    messages = [{"role": "user", "content": "solve 2x = 4"}, {"role": "assistant", "content": "x = 2"},
                {"role": "user", "content": "thanks! who wrote hamlet?"}]
    r = httpx.post(f"{gateway}/v1/route", json={"messages": messages})
    assert r.status_code == 200
    body = r.json()
    assert body["experts"] == ["general"]
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-6
    assert body["timings"]["route_ms"] >= 0
    assert body["router"] == "KeywordRouter"


def test_health_ready_metrics(gateway: str, client: openai.OpenAI) -> None:
    assert httpx.get(f"{gateway}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway}/ready")
    assert ready.status_code == 200 and ready.json()["experts"] == {"math": True, "general": True}
    client.chat.completions.create(model="math", messages=[{"role": "user", "content": "1+1"}])
    text = httpx.get(f"{gateway}/metrics").text
    assert 'octoroute_requests_total{endpoint="chat",expert="math",model="math",status="200"}' in text
    assert "octoroute_routing_seconds_bucket" in text
    assert 'octoroute_tokens_total{direction="completion",expert="math"}' in text


def test_unknown_path_is_openai_shaped(gateway: str) -> None:
    r = httpx.get(f"{gateway}/v1/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_request_id_is_echoed(gateway: str) -> None:
    r = httpx.get(f"{gateway}/health", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_the_readme_examples_work_after_its_install_command(gateway: str, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 17 #11: the README's install command is `pip install -e .`, so the `openai` SDK its Python example
    imports must be a dependency of the package, and the example itself must run (here against this test's
    gateway instead of localhost:8000)."""
    import re
    import tomllib

    from tests.harness import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"openai\b", dep) for dep in project["dependencies"])
    readme = (REPO / "README.md").read_text()
    assert "pip install -e ." in readme
    snippet = re.search(r"```python\n(.*?)```", readme, re.S)
    assert snippet is not None and "from openai import OpenAI" in snippet.group(1)
    code = snippet.group(1).replace("http://localhost:8000/v1", f"{gateway}/v1")
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("general: SQL to count rows per day")
