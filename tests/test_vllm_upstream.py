"""A demo expert served by real vLLM (CPU): the shared tokenizer's chat template works there, and vLLM's
logprobs agree with LocalExpert's, which is what per-token fusion across backends relies on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from gateway.config import ExpertConfig
from gateway.experts.local import LocalExpert

pytestmark = pytest.mark.vllm

VllmExpert = tuple[str, str, Path]
MESSAGES = [{"role": "user", "content": "Solve 3x - 7 = 11 for x."}]
TIMEOUT = 60.0  # generous: the team's 2 shared cores are often busy


@pytest.fixture(scope="module")
def local(vllm_expert: VllmExpert) -> LocalExpert:
    _, name, model_dir = vllm_expert
    return LocalExpert(ExpertConfig(name=name, backend="local", path=str(model_dir)))


def test_chat_with_the_shared_template(vllm_expert: VllmExpert, local: LocalExpert) -> None:
    base_url, name, _ = vllm_expert
    assert [m["id"] for m in httpx.get(f"{base_url}/v1/models", timeout=TIMEOUT).json()["data"]] == [name]
    ids = httpx.post(f"{base_url}/tokenize", json={"model": name, "messages": MESSAGES,
                                                   "add_generation_prompt": True}, timeout=TIMEOUT).json()["tokens"]
    assert ids == local.tokenize_chat(MESSAGES)

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    whole = client.chat.completions.create(model=name, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
                                           max_tokens=16)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=name, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
                                            max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


@pytest.mark.parametrize("messages", [
    MESSAGES,
    [{"role": "user", "content": "Can my landlord keep the deposit?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "SQL to count rows per day"}],
])
def test_top5_logprobs_match_local_expert(vllm_expert: VllmExpert, local: LocalExpert,
                                          messages: list[dict[str, str]]) -> None:
    base_url, name, _ = vllm_expert
    ids = local.tokenize_chat(messages)
    r = httpx.post(f"{base_url}/v1/completions", json={
        "model": name, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 5,
        "return_tokens_as_token_ids": True,
    }, timeout=TIMEOUT).json()
    top = r["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top) == 5
    mine = local.next_token_logprobs(ids)
    for key, theirs in top.items():
        token = int(key.removeprefix("token_id:"))
        assert abs(mine[token].item() - theirs) < 0.05, (token, mine[token].item(), theirs)
