"""End to end with real parts: the embedded default (bundled router + local demo experts) and a real
vLLM server behind the gateway, driven by the official openai SDK (sync and async, stream and not)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.config import embedded_default, load_config
from tests.harness import run_gateway


@pytest.fixture(scope="module")
def embedded(demo_experts_dir: Path) -> Iterator[str]:
    """`octoroute serve` without a config: the bundled router and the five local demo experts."""
    config = load_config(None, environ={})
    assert {e.path for e in config.experts} == {str(demo_experts_dir / e.name) for e in config.experts}
    with run_gateway(config) as url:
        yield url


def test_embedded_default_ready_with_the_bundled_router(embedded: str) -> None:
    ready = httpx.get(f"{embedded}/ready").json()
    assert ready["router"] == "functional_token"
    assert ready["experts"] == {d: True for d in ("legal", "finance", "math", "code", "general")}


@pytest.mark.parametrize(("query", "expert"), [
    ("Solve for x: 3x + 7 = 22. Show your steps.", "math"),
    ("Write a Python function that reverses a linked list.", "code"),
    ("My landlord kept my security deposit without giving a reason. Can I sue him in small claims court?",
     "legal"),
    ("How do I dispute a charge on my credit card statement?", "finance"),
    ("What is the capital of Australia?", "general"),
])
def test_embedded_default_routes_and_answers(embedded: str, query: str, expert: str) -> None:
    client = openai.OpenAI(base_url=f"{embedded}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": query}], max_tokens=12, temperature=0)
    answered_by = raw.headers["x-octoroute-expert"]
    if answered_by == "fusion":  # the router was unsure: the most probable expert leads the fused set
        assert raw.headers["x-octoroute-fused"].split(",")[0] == expert
    else:
        assert answered_by == expert
    completion = raw.parse()
    assert completion.model == answered_by
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 12
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_embedded_default_streams(embedded: str) -> None:
    client = openai.OpenAI(base_url=f"{embedded}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Integrate x^2 from 0 to 3."}], max_tokens=10,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Integrate x^2 from 0 to 3."}], max_tokens=10,
        temperature=0)
    assert again.choices[0].message.content == text  # greedy is deterministic (and now cached)


def test_embedded_default_refuses_what_local_experts_cannot_do(embedded: str) -> None:
    r = httpx.post(f"{embedded}/v1/chat/completions", json={
        "model": "math", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_router_chosen_fusion_answers_alone_when_the_request_cannot_be_fused(embedded: str) -> None:
    """The router is unsure (finance and math both likely), so it would fuse; logit_bias is something fusion
    cannot honour but one local expert can: the client asked for "auto", not fusion, so its top expert answers."""
    body = {"model": "auto", "messages": [{"role": "user", "content": "What is 15% of the loan interest?"}],
            "max_tokens": 4, "temperature": 0}
    route = httpx.post(f"{embedded}/v1/route", json={"messages": body["messages"]}, timeout=60).json()
    fused = httpx.post(f"{embedded}/v1/chat/completions", json=body, timeout=60)
    assert fused.status_code == 200 and fused.headers["x-octoroute-expert"] == "fusion", fused.text
    alone = httpx.post(f"{embedded}/v1/chat/completions", json={**body, "logit_bias": {"5": -1}}, timeout=60)
    assert alone.status_code == 200, alone.text
    top = route["experts"][0]  # the most probable expert
    assert route["mode"] == "multi"
    assert alone.headers["x-octoroute-expert"] == top and "x-octoroute-fused" not in alone.headers
    assert "logit_bias" in alone.headers["x-octoroute-fusion-refused"]
    pinned = httpx.post(f"{embedded}/v1/chat/completions", json={**body, "model": "fusion", "logit_bias": {"5": -1}})
    assert pinned.status_code == 400 and pinned.json()["error"]["param"] == "logit_bias"  # asked for: say why not
    several = httpx.post(f"{embedded}/v1/chat/completions", json={**body, "model": "math", "n": 2})
    assert several.status_code == 400 and several.json()["error"]["param"] == "n"  # local experts give one choice
    # the embedded default has no vllm expert: the message must not send the client looking for one
    assert "vllm" not in several.json()["error"]["message"]
    assert "no expert of this gateway can honour it" in several.json()["error"]["message"]


@pytest.mark.vllm
async def test_gateway_over_real_vllm_with_the_sdk(vllm_expert: tuple[str, str, Path],
                                                   demo_experts_dir: Path) -> None:
    base_url, served, _ = vllm_expert
    config = embedded_default(demo_experts_dir)
    config["experts"] = [e for e in config["experts"] if e["name"] != "math"] + [
        {"name": "math", "backend": "vllm", "base_url": f"{base_url}/v1", "model": served}]
    with run_gateway(config) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "What is 17% of 240?"}], max_tokens=8,
            temperature=0)
        assert raw.headers["x-octoroute-expert"] == "math"
        assert raw.parse().model == served  # vLLM answered
        stream = client.chat.completions.create(
            model="math", messages=[{"role": "user", "content": "What is 17% of 240?"}], max_tokens=8,
            temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == raw.parse().choices[0].message.content
        text = client.completions.create(model="math", prompt="The sum of", max_tokens=5, temperature=0)
        assert text.usage is not None and text.usage.completion_tokens == 5

        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        result = await aclient.chat.completions.create(
            model="math", messages=[{"role": "user", "content": "What is 17% of 240?"}], max_tokens=8,
            temperature=0.0)
        assert result.choices[0].message.content == streamed
        astream = await aclient.chat.completions.create(
            model="math", messages=[{"role": "user", "content": "What is 7 times 8?"}], max_tokens=6,
            stream=True)
        pieces = [c async for c in astream]
        assert pieces and pieces[-1].choices[0].finish_reason in ("stop", "length")
        await aclient.close()

        # n > 1 goes to vLLM (which refuses it with greedy decoding); seeded, it is cached as a whole and a
        # stream of the same request replays every choice
        several = client.chat.completions.with_raw_response.create(
            model="math", messages=[{"role": "user", "content": "What is 9 times 9?"}], max_tokens=6,
            temperature=1.0, seed=7, n=2)
        answer = several.parse()
        assert [c.index for c in answer.choices] == [0, 1] and several.headers["x-octoroute-cache"] == "miss"
        with client.chat.completions.with_streaming_response.create(
                model="math", messages=[{"role": "user", "content": "What is 9 times 9?"}], max_tokens=6,
                temperature=1.0, seed=7, n=2, stream=True) as replay:
            assert replay.headers["x-octoroute-cache"] == "hit"
            replayed = list(replay.parse())
        for choice in answer.choices:
            text = "".join(c.choices[0].delta.content or "" for c in replayed
                           if c.choices and c.choices[0].index == choice.index)
            assert text and text == choice.message.content
        sampled = list(client.chat.completions.create(
            model="math", messages=[{"role": "user", "content": "Name a prime."}], max_tokens=5, n=3,
            temperature=1.0, stream=True))
        finished = {c.choices[0].index: c.choices[0].finish_reason for c in sampled
                    if c.choices and c.choices[0].finish_reason}
        assert set(finished) == {0, 1, 2} and set(finished.values()) <= {"stop", "length"}
        metrics = httpx.get(f"{url}/metrics").text
        assert 'octoroute_tokens_total{direction="completion",expert="math"}' in metrics



def test_embedded_default_offers_fusion(embedded: str) -> None:
    client = openai.OpenAI(base_url=f"{embedded}/v1", api_key="unused", max_retries=0)
    assert "fusion" in [m.id for m in client.models.list()]
    raw = client.chat.completions.with_raw_response.create(
        model="fusion", messages=[{"role": "user", "content": "What is 15% of the loan interest?"}],
        max_tokens=8, temperature=0)
    assert raw.headers["x-octoroute-expert"] == "fusion"
    fused = raw.headers["x-octoroute-fused"].split(",")
    assert len(fused) >= 2 and set(fused) <= {"legal", "finance", "math", "code", "general"}
    completion = raw.parse()
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(
        model="fusion", messages=[{"role": "user", "content": "What is 15% of the loan interest?"}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content  # greedy fusion is deterministic
    assert chunks[-1].usage is not None
    metrics = httpx.get(f"{embedded}/metrics").text
    assert "octoroute_fusion_steps_total" in metrics and 'mode="fusion"' in metrics
