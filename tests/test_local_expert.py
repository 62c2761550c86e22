"""LocalExpert on a real demo expert: decoding controls, OpenAI shapes, UTF-8 safety, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from gateway.config import ExpertConfig
from gateway.experts.base import UpstreamError
from gateway.experts.local import Detokenizer, LocalExpert

MESSAGES = [{"role": "user", "content": "What is the derivative of x^2 + 3x?"}]


@pytest.fixture(scope="module")
def expert(demo_experts_dir: Path) -> LocalExpert:
    return LocalExpert(ExpertConfig(name="math", backend="local", path=str(demo_experts_dir / "math"),
                                    model="demo-math"))


def no_eos(expert: LocalExpert) -> dict[str, float]:
    """logit_bias that forbids every EOS id, so a generation runs to max_tokens."""
    return {str(i): -100.0 for i in expert.eos_ids}


async def chunks(expert: LocalExpert, endpoint: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    return [c async for c in expert.stream(endpoint, body)]


async def test_greedy_is_deterministic_and_matches_uncached_argmax(expert: LocalExpert) -> None:
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 12, "logit_bias": no_eos(expert)}
    first, second = await expert.generate("chat", body), await expert.generate("chat", body)
    assert first["choices"] == second["choices"]
    # The KV-cached loop must pick what a full forward pass over the growing prefix picks.
    ids = expert.tokenize_chat(MESSAGES)
    out: list[int] = []
    for _ in range(12):
        lp = expert.next_token_logprobs(ids + out)
        lp[list(expert.eos_ids)] = -torch.inf
        out.append(int(lp.argmax()))
    assert first["choices"][0]["message"]["content"] == expert.tokenizer.decode(out, skip_special_tokens=True)
    assert first["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}


async def test_seed_makes_sampling_reproducible(expert: LocalExpert) -> None:
    body = {"prompt": "The integral of", "temperature": 1.0, "max_tokens": 24, "logit_bias": no_eos(expert)}
    texts = [(await expert.generate("completions", body | {"seed": s}))["choices"][0]["text"] for s in (7, 7, 8)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


async def test_top_p_tiny_is_greedy(expert: LocalExpert) -> None:
    base = {"prompt": "Let x be", "max_tokens": 10, "logit_bias": no_eos(expert)}
    greedy = await expert.generate("completions", base | {"temperature": 0})
    nucleus = await expert.generate("completions", base | {"temperature": 1.5, "top_p": 1e-6, "seed": 3})
    assert nucleus["choices"][0]["text"] == greedy["choices"][0]["text"]


async def test_max_tokens_finishes_with_length(expert: LocalExpert) -> None:
    r = await expert.generate("chat", {"messages": MESSAGES, "max_tokens": 5, "logit_bias": no_eos(expert)})
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 5
    r = await expert.generate("completions", {"prompt": "2 + 2 =", "logit_bias": no_eos(expert)})
    assert r["usage"]["completion_tokens"] == 16  # the OpenAI default for completions


async def test_eos_finishes_with_stop(expert: LocalExpert) -> None:
    eos = min(expert.eos_ids)
    r = await expert.generate("chat", {"messages": MESSAGES, "max_tokens": 50, "logit_bias": {str(eos): 100}})
    assert r["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": "stop"}
    assert r["usage"]["completion_tokens"] == 1


async def test_stop_strings_end_output_before_them(expert: LocalExpert) -> None:
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 40, "logit_bias": no_eos(expert)}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in await chunks(expert, "chat", body)]
    full = "".join(pieces)
    # A stop string that straddles two streamed pieces: its first half must be held back.
    ends = [sum(map(len, pieces[: i + 1])) for i in range(len(pieces))]
    cut = min((e for e in ends if 2 <= e <= len(full) - 2), key=lambda e: abs(e - len(full) // 2))
    stop = full[cut - 2 : cut + 2]
    expected = full[: full.index(stop)]
    r = await expert.generate("chat", body | {"stop": ["@@never@@", stop]})
    assert r["choices"][0]["message"]["content"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    parts = await chunks(expert, "chat", body | {"stop": stop})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in parts) == expected
    assert parts[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_stream_shapes_and_usage(expert: LocalExpert) -> None:
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 20}
    whole = await expert.generate("chat", body)
    assert whole["object"] == "chat.completion" and whole["model"] == "demo-math"
    assert whole["id"].startswith("chatcmpl-") and isinstance(whole["created"], int)
    parts = await chunks(expert, "chat", body | {"stream": True, "stream_options": {"include_usage": True}})
    assert {(c["id"], c["object"], c["model"]) for c in parts} == {(parts[0]["id"], "chat.completion.chunk",
                                                                   "demo-math")}
    assert parts[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert parts[-1]["choices"] == [] and parts[-1]["usage"] == whole["usage"]
    final = parts[-2]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in parts[:-2])
    assert all(c["usage"] is None for c in parts[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in parts[:-1])
    assert text == whole["choices"][0]["message"]["content"]


async def test_completions_stream_shapes(expert: LocalExpert) -> None:
    body = {"prompt": "Find all real x such that", "temperature": 0, "max_tokens": 8}
    whole = await expert.generate("completions", body)
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert set(whole["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    parts = await chunks(expert, "completions", body)
    assert all(c["object"] == "text_completion" and "usage" not in c for c in parts)
    assert "".join(c["choices"][0]["text"] for c in parts) == whole["choices"][0]["text"]
    assert parts[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    # A prompt given as token ids is the same prompt.
    ids = expert.tokenizer.encode(body["prompt"])
    assert (await expert.generate("completions", body | {"prompt": ids}))["choices"] == whole["choices"]


def test_detokenizer_never_splits_a_character(expert: LocalExpert) -> None:
    text = "naïve café — 数学 🚀 ∑ résumé"
    ids = expert.tokenizer.encode(text)
    assert any("\ufffd" in expert.tokenizer.decode([i]) for i in ids)  # some tokens are partial characters
    detok = Detokenizer(expert.tokenizer, expert.tokenizer.encode("Say:"))
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


async def test_disconnect_stops_the_worker(expert: LocalExpert) -> None:
    steps = 0

    def count(*_: Any) -> None:
        nonlocal steps
        steps += 1

    hook = expert.model.register_forward_hook(count)
    try:
        stream = expert.stream("chat", {"messages": MESSAGES, "max_tokens": 900, "logit_bias": no_eos(expert)})
        for _ in range(4):
            await anext(stream)
        await stream.aclose()  # what the server does when the client goes away
        await asyncio.sleep(0.2)
        stopped_at = steps
        await asyncio.sleep(0.5)
        assert steps == stopped_at < 100
    finally:
        hook.remove()
    r = await expert.generate("chat", {"messages": MESSAGES, "max_tokens": 2})  # the worker is free again
    assert r["usage"]["completion_tokens"] <= 2


async def test_bad_requests_are_openai_400s(expert: LocalExpert) -> None:
    with pytest.raises(UpstreamError) as err:
        await expert.generate("completions", {"prompt": "x " * 1100})
    assert err.value.status == 400 and err.value.body and err.value.body["error"]["param"] == "prompt"
    with pytest.raises(UpstreamError) as err:
        await expert.generate("chat", {"messages": MESSAGES, "max_tokens": 5000})
    assert err.value.status == 400 and err.value.kind == "http_4xx"
    with pytest.raises(UpstreamError):
        await anext(expert.stream("chat", {"messages": MESSAGES, "n": 2}))


@pytest.mark.parametrize(("endpoint", "body", "param"), [
    ("completions", {"prompt": "", "max_tokens": 3}, "prompt"),  # was a raw torch error (500), a breaker failure
    ("completions", {"prompt": "hi", "max_tokens": 3, "seed": 2**64}, "seed"),
    ("chat", {"messages": MESSAGES, "max_tokens": 3, "seed": -(2**63) - 1}, "seed"),
])
async def test_input_the_model_cannot_take_is_a_400_naming_the_field(expert: LocalExpert, endpoint: Any,
                                                                     body: dict[str, Any], param: str) -> None:
    """Refused before the worker thread runs, as a client error (``http_4xx``: never counted against the expert)."""
    for call in (expert.generate(endpoint, body), anext(expert.stream(endpoint, body))):
        with pytest.raises(UpstreamError) as err:
            await call
        assert err.value.kind == "http_4xx" and err.value.status == 400 and not err.value.expert_fault
        assert err.value.body and err.value.body["error"]["param"] == param
        assert "torch" not in str(err.value).lower() and "overflow" not in str(err.value).lower()


async def test_a_failure_inside_generation_reaches_the_client_without_its_text(expert: LocalExpert) -> None:
    """An exception in the decode loop: a generic ``internal`` error (the cause is kept for the log), which is
    not an expert fault, so it never opens the breaker."""
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals 0xdeadbeef")

    original = expert._decode
    expert._decode = explode  # type: ignore[method-assign]
    try:
        with pytest.raises(UpstreamError) as err:
            await expert.generate("chat", {"messages": MESSAGES, "max_tokens": 2})
    finally:
        expert._decode = original  # type: ignore[method-assign]
    assert err.value.kind == "internal" and not err.value.expert_fault
    assert "0xdeadbeef" not in str(err.value) and "0xdeadbeef" in str(err.value.__cause__)


async def test_aclose_ends_running_and_queued_generations(demo_experts_dir: Path) -> None:
    expert = LocalExpert(ExpertConfig(name="code", backend="local", path=str(demo_experts_dir / "code")))
    body = {"messages": MESSAGES, "max_tokens": 900, "logit_bias": no_eos(expert)}
    stream = expert.stream("chat", body)
    await anext(stream)
    queued = asyncio.ensure_future(expert.generate("chat", body))
    await asyncio.sleep(0.1)  # now submitted, waiting behind the stream for the worker
    await expert.aclose()
    assert not await expert.healthy()
    with pytest.raises(UpstreamError) as err:
        async for _ in stream:
            pass
    assert err.value.status == 503 and not err.value.before_first_byte
    with pytest.raises(UpstreamError):
        await asyncio.wait_for(queued, 5)
