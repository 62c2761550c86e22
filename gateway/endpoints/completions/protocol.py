"""Request body of POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from gateway.endpoints.common import SamplingRequest


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[
        list[int], Field(min_length=1)]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: object) -> object:
        if isinstance(v, list) and v and isinstance(v[0], str) and len(v) > 1:
            raise ValueError("batched prompts are not supported: send one prompt per request")
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
