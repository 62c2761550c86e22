"""/v1/responses in front of a real vLLM server (CPU) serving the math demo expert: the translation holds for
vLLM's own chat completions and chunks (role-only first chunk, usage chunk), streamed or not, and chained."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from router_model import KeywordRouter
from tests.harness import run_gateway

pytestmark = pytest.mark.vllm
TIMEOUT = 120.0  # the team's 2 shared cores are often busy


@pytest.fixture(scope="module")
def client(vllm_expert: tuple[str, str, Path]) -> Iterator[openai.OpenAI]:
    base_url, name, _ = vllm_expert
    config = {"experts": [{"name": name, "backend": "vllm", "base_url": f"{base_url}/v1"}], "default_expert": name,
              "cache": {"backend": "none"}, "auth": {"api_keys_env": None}}
    with run_gateway(config, router=KeywordRouter()) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT)


def test_plain_streamed_and_chained_responses_from_vllm(client: openai.OpenAI) -> None:
    ask = {"model": "auto", "input": "Solve 3x - 7 = 11 for x.", "temperature": 0, "max_output_tokens": 12}
    whole = client.responses.create(**ask)  # type: ignore[call-overload]
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage is not None and whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 12
    with client.responses.stream(**ask) as stream:  # type: ignore[call-overload]
        events = list(stream)  # not get_final_response(): the SDK wants response.completed, not .incomplete
    assert [e.type for e in events][:4] == ["response.created", "response.in_progress",
                                            "response.output_item.added", "response.content_part.added"]
    assert events[-1].type == f"response.{whole.status}"
    streamed = events[-1].response  # type: ignore[union-attr]
    assert streamed.output_text == whole.output_text and streamed.usage == whole.usage
    chained = client.responses.create(model="auto", input="Now check it.", previous_response_id=whole.id,
                                      temperature=0, max_output_tokens=8)
    assert chained.output_text and chained.usage is not None
    assert chained.usage.input_tokens > whole.usage.input_tokens  # the first turn came along
