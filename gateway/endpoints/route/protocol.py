"""POST /v1/route: explain a routing decision without generating."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from gateway.endpoints.chat_completions.protocol import ChatMessage


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
