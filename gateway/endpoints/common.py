"""Wire-format pieces shared by /v1/chat/completions and /v1/completions.

Validated at the edge, strictly (no ``"0.5"`` or ``true`` for a number, as OpenAI refuses them): fields
outside ``openai_fields`` are refused (as OpenAI does), NaN/inf are refused, and parameters the gateway
cannot honour (batched prompts) are refused with a clear message. ``n`` > 1 is forwarded to vllm experts;
local experts refuse it, and a router-chosen fusion answers from one expert.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.endpoints.openai_fields import SAMPLING_FIELDS, STREAM_OPTIONS_FIELDS, Use, dropped

MAX_CHOICES = 16  # each choice is a whole generation on the expert: bound what one request may ask
INT64 = 2**63  # seeds are 64-bit integers (OpenAI, vLLM, torch.Generator.manual_seed)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    FIELDS: ClassVar[dict[str, Use]] = STREAM_OPTIONS_FIELDS
    include_usage: bool | None = False
    include_obfuscation: bool | None = None


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    FIELDS: ClassVar[dict[str, Use]] = SAMPLING_FIELDS

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES, description="Choices per request: vllm experts only.")] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-INT64, lt=INT64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # vLLM sampling extensions, forwarded as they are.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None

    def wire(self) -> dict[str, Any]:
        """The body to forward: what the client set, less the fields ``openai_fields`` does not forward."""
        exclude: dict[str, Any] = dict.fromkeys(dropped(self.FIELDS), True)
        exclude["stream_options"] = set(dropped(StreamOptions.FIELDS))
        exclude.update(self._nested_exclude())
        return self.model_dump(exclude_unset=True, exclude_none=True, exclude=exclude)

    def _nested_exclude(self) -> dict[str, Any]:
        return {}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, v: StreamOptions | None, info: Any) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = next((k for k in v or {} if not (k.isascii() and k.isdigit() and len(k) <= 9)), None)
        if bad is not None:
            raise ValueError(f"keys are token ids (integers written as strings, e.g. {{\"50256\": -100}}), "
                             f"not {bad[:40]!r}")
        return v


def neutral(value: object, name: str, instead: str) -> object:
    """For ``NEUTRAL_ONLY`` fields: null passes, anything else is refused with what to send instead."""
    if value is not None:
        raise ValueError(f"{name} is not supported by this gateway; {instead}")
    return value


Modality = Literal["text", "audio"]
