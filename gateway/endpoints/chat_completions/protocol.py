"""Request body of POST /v1/chat/completions: every field of OpenAI's API (``openai_fields.CHAT_FIELDS``)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gateway.endpoints.common import Modality, SamplingRequest, neutral
from gateway.endpoints.openai_fields import CHAT_FIELDS, MESSAGE_FIELDS, Use, dropped

TEXT_ONLY = "the experts behind this gateway read text only; send the content as text parts"


class ContentPart(BaseModel):
    """One part of a message's ``content`` array. ``text`` and ``refusal`` (an assistant's refusal in
    replayed history, read as text) are served; ``image_url``, ``input_audio`` and ``file`` are documented
    by OpenAI and refused here with the reason."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "refusal", "image_url", "input_audio", "file"]
    text: str | None = None
    refusal: str | None = None
    image_url: dict[str, Any] | None = None
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _served(self) -> ContentPart:
        if self.type not in ("text", "refusal"):
            raise ValueError(f"content part type {self.type!r} is not supported: {TEXT_ONLY}")
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} part needs its {self.type!r} string")
        return self

    @property
    def value(self) -> str:
        return (self.text if self.type == "text" else self.refusal) or ""


class ChatMessage(BaseModel):
    """One message of any role; which fields a role may carry is OpenAI's to check, not ours."""

    model_config = ConfigDict(extra="forbid", strict=True)
    FIELDS: ClassVar[dict[str, Use]] = MESSAGE_FIELDS

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    annotations: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None

    @field_validator("role")
    @classmethod
    def _no_function_role(cls, v: str) -> str:
        if v == "function":
            raise ValueError("the 'function' role is deprecated by OpenAI and not supported; "
                             "send the result as a 'tool' message with tool_call_id")
        return v

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, v: object) -> object:
        return neutral(v, "function_call", "send tool_calls instead")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.value for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    FIELDS: ClassVar[dict[str, Use]] = CHAT_FIELDS

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # Accepted, not forwarded (openai_fields says why).
    store: bool | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None
    prompt_cache_retention: Literal["in-memory", "24h"] | None = None
    prediction: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    # Accepted with their neutral value only.
    modalities: list[Modality] | None = None
    audio: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and "audio" in v:
            raise ValueError("audio output is not supported: the experts behind this gateway answer in text; "
                             'send ["text"] or leave modalities out')
        return v

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, v: object) -> object:
        return neutral(v, "audio output", "leave audio out (or null)")

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: object) -> object:
        return neutral(v, "functions (deprecated by OpenAI)", "send tools instead")

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, v: object) -> object:
        return neutral(v, "function_call (deprecated by OpenAI)", "send tool_choice instead")

    def _nested_exclude(self) -> dict[str, Any]:
        return {"messages": {"__all__": set(dropped(ChatMessage.FIELDS))}}

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
