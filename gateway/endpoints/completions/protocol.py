"""Request body of POST /v1/completions (legacy): every field of OpenAI's API
(``openai_fields.COMPLETION_FIELDS``); one prompt per request."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, ValidationInfo, field_validator

from gateway.endpoints.common import MAX_CHOICES, SamplingRequest
from gateway.endpoints.openai_fields import COMPLETION_FIELDS, Use


class CompletionRequest(SamplingRequest):
    FIELDS: ClassVar[dict[str, Use]] = COMPLETION_FIELDS

    # A prompt with nothing in it has nothing to continue from: refused here (vLLM refuses it too) rather
    # than left to fail inside an expert.
    prompt: Annotated[str, Field(min_length=1)] | Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)] | Annotated[
        list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: object) -> object:
        if isinstance(v, list) and v and isinstance(v[0], str | list) and len(v) > 1:
            raise ValueError("batched prompts are not supported: send one prompt per request")
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], list):
            return v[0]  # one prompt of token ids, written as a batch of one
        if v == "" or v == [""]:
            raise ValueError("the prompt is empty: send the text to complete")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_covers_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v < (info.data.get("n") or 1):
            raise ValueError("best_of must be greater than or equal to n")
        return v

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return ""
