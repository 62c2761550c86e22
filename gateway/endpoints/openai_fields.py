"""Every request field of OpenAI's Chat Completions and Completions APIs, and what the gateway does with it.

This table is the one place that decides it; the request models (``protocol.py``) accept exactly these
names (``tests/test_wire_compat.py`` checks both ways, field by field), and ``wire()`` forwards only the
``FORWARD`` ones. Any other field is refused with 400 ``Unrecognized request argument supplied``.

Source: the OpenAI API reference (platform.openai.com/docs/api-reference), "Create chat completion"
(request body, the message objects of each role and their content parts) and "Create completion"
(legacy), as of 2025-11; plus vLLM's documented sampling extensions (docs.vllm.ai, "Extra Parameters").

- ``FORWARD``: sent to the expert. A backend that cannot honour a value that asks for something
  (``tools`` on a local expert) refuses the request with a 400 naming the field.
- ``DROP``: accepted and not forwarded. It concerns OpenAI's platform (storage, billing tier, abuse
  monitoring, its prompt cache, latency hints), or it asks OpenAI-hosted models for a behaviour no expert
  here has and that is safe to answer without (``verbosity``, ``web_search_options``, ``prediction``).
  Dropped fields stay out of the cache key too.
- ``NEUTRAL_ONLY``: accepted with its neutral value (``null``, ``modalities: ["text"]``) — what SDKs send
  by default; any other value asks for something no expert here can give (audio output, the deprecated
  ``functions`` API) and is refused with a 400 that says what to send instead.
"""

from __future__ import annotations

from typing import Final, Literal

Use = Literal["forward", "drop", "neutral_only"]
FORWARD: Final = "forward"
DROP: Final = "drop"
NEUTRAL_ONLY: Final = "neutral_only"

# Fields both endpoints share (SamplingRequest).
SAMPLING_FIELDS: Final[dict[str, Use]] = {
    "model": FORWARD,  # rewritten to the expert's served model name
    "max_tokens": FORWARD,
    "temperature": FORWARD,
    "top_p": FORWARD,
    "n": FORWARD,
    "stream": FORWARD,
    "stream_options": FORWARD,
    "stop": FORWARD,
    "seed": FORWARD,
    "presence_penalty": FORWARD,
    "frequency_penalty": FORWARD,
    "logit_bias": FORWARD,
    "user": DROP,  # end-user id for OpenAI's abuse monitoring
    # vLLM sampling extensions (not OpenAI's): forwarded as they are.
    "top_k": FORWARD,
    "min_p": FORWARD,
    "repetition_penalty": FORWARD,
}

CHAT_FIELDS: Final[dict[str, Use]] = {
    **SAMPLING_FIELDS,
    "messages": FORWARD,
    "max_completion_tokens": FORWARD,
    "logprobs": FORWARD,
    "top_logprobs": FORWARD,
    "response_format": FORWARD,
    "tools": FORWARD,
    "tool_choice": FORWARD,
    "parallel_tool_calls": FORWARD,
    "reasoning_effort": FORWARD,  # vLLM hands it to reasoning models' chat templates
    "store": DROP,  # OpenAI stores the completion for its dashboard / evals
    "metadata": DROP,  # tags for stored completions
    "service_tier": DROP,  # OpenAI's billing / latency tier
    "safety_identifier": DROP,  # end-user id for OpenAI's abuse monitoring
    "prompt_cache_key": DROP,  # OpenAI's prompt-cache bucketing
    "prompt_cache_retention": DROP,
    "prediction": DROP,  # predicted output: a latency hint, the answer is the same without it
    "verbosity": DROP,  # a hint to OpenAI's GPT-5 models
    "web_search_options": DROP,  # OpenAI's hosted web search
    "modalities": NEUTRAL_ONLY,  # ["text"]; "audio" asks for audio output
    "audio": NEUTRAL_ONLY,  # audio output parameters
    "functions": NEUTRAL_ONLY,  # deprecated by OpenAI in favour of tools
    "function_call": NEUTRAL_ONLY,  # deprecated by OpenAI in favour of tool_choice
}

COMPLETION_FIELDS: Final[dict[str, Use]] = {
    **SAMPLING_FIELDS,
    "prompt": FORWARD,
    "best_of": FORWARD,
    "echo": FORWARD,
    "logprobs": FORWARD,
    "suffix": FORWARD,
}

STREAM_OPTIONS_FIELDS: Final[dict[str, Use]] = {
    "include_usage": FORWARD,
    "include_obfuscation": DROP,  # OpenAI pads stream events against side channels; nothing to pad here
}

# Fields of a message object, over every role (system, developer, user, assistant, tool).
MESSAGE_FIELDS: Final[dict[str, Use]] = {
    "role": FORWARD,
    "content": FORWARD,
    "name": FORWARD,  # chat templates may use it
    "tool_calls": FORWARD,  # assistant
    "tool_call_id": FORWARD,  # tool
    "refusal": DROP,  # assistant: OpenAI's refusal text of an earlier answer (the SDK's model_dump sends null)
    "audio": DROP,  # assistant: id of an earlier audio answer
    "annotations": DROP,  # assistant: URL citations of an earlier web-search answer
    "function_call": NEUTRAL_ONLY,  # assistant: deprecated by OpenAI in favour of tool_calls
}

# Content part types of a message's ``content`` array.
CONTENT_PART_TYPES: Final[dict[str, Use]] = {
    "text": FORWARD,
    "refusal": FORWARD,  # assistant history; read as text by vLLM
    "image_url": NEUTRAL_ONLY,  # the experts read text only: refused
    "input_audio": NEUTRAL_ONLY,
    "file": NEUTRAL_ONLY,
}


def dropped(table: dict[str, Use]) -> frozenset[str]:
    """The names of ``table`` that are never forwarded (dropped, or neutral when they got this far)."""
    return frozenset(name for name, use in table.items() if use != FORWARD)
