"""Wire format of OpenAI's Responses API: the request body, the response object, input items, stream events.

Source: the OpenAI API reference, "Responses" (platform.openai.com/docs/api-reference/responses: create,
the response object, input items, streaming events), as the ``openai`` SDK encodes it
(``openai/types/responses/``: ``response_create_params.py``, ``response.py``, ``response_input_item_param.py``,
``response_*_event.py``). Only text and function calling: the experts behind the gateway are text models.

Request fields, like the chat endpoint's (``gateway/endpoints/openai_fields.py``):

- used: ``model``, ``input``, ``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``,
  ``store``, ``previous_response_id``, ``metadata`` (echoed), ``tools`` (function tools), ``tool_choice``,
  ``parallel_tool_calls``, ``text`` (``format``: text, json_object, json_schema), ``reasoning.effort``.
- accepted and dropped: OpenAI-platform fields that change nothing here (``user``, ``safety_identifier``,
  ``service_tier``, ``prompt_cache_key``, ``prompt_cache_retention``, ``stream_options``, ``text.verbosity``)
  and ``include`` entries naming outputs the gateway never produces (``message.output_text.logprobs`` is refused).
- neutral only: ``background`` (false), ``truncation`` ("disabled"), ``reasoning.summary``, ``conversation``,
  ``prompt``, ``max_tool_calls``, ``top_logprobs`` (null/0); anything else is a 400 that says why.

Any other field is refused with 400 ``Unrecognized request argument supplied``, as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["completed", "failed", "in_progress", "incomplete"]
_WIRE = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# -- input items (response_input_item_param.py) ---------------------------------------------------


class InputText(BaseModel):
    model_config = _WIRE
    type: Literal["input_text"]
    text: str


class OutputText(BaseModel):
    """Text an assistant wrote (``response_output_text.py``); annotations and logprobs are always empty here."""

    model_config = _WIRE
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None


class Refusal(BaseModel):
    model_config = _WIRE
    type: Literal["refusal"]
    refusal: str


# Tags name the union's branches in pydantic's error locations: CamelCase, so that the edge's field paths
# (``input[0].content[1]``, ``gateway.endpoints.edge.api_path``) leave them out like other branch names.
_PART_TAGS = {"input_text": "InputText", "output_text": "OutputText", "refusal": "Refusal"}
_ITEM_TAGS = {"message": "Message", "function_call": "FunctionCall", "function_call_output": "FunctionCallOutput"}


def _by_type(tags: dict[str, str], untyped: str | None, refusal: str) -> Discriminator:
    """Pick a union branch by ``type`` (``untyped``: the type when it is left out); others get ``refusal``."""

    def tag(value: Any) -> str | None:
        kind = value.get("type", untyped) if isinstance(value, dict) else getattr(value, "type", None)
        return tags.get(kind) if isinstance(kind, str) else None

    return Discriminator(tag, custom_error_type="unsupported_type", custom_error_message=refusal)


ContentPart = Annotated[
    Annotated[InputText, Tag("InputText")] | Annotated[OutputText, Tag("OutputText")]
    | Annotated[Refusal, Tag("Refusal")],
    _by_type(_PART_TAGS, None, "the experts read text only: content parts must be input_text, output_text or "
                               "refusal (no images, files or audio)")]


class MessageItem(BaseModel):
    """A message (EasyInputMessage, input message or a previous output message): ``type`` may be left out."""

    model_config = _WIRE
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made (``response_function_tool_call.py``), sent back with its output."""

    model_config = _WIRE
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(BaseModel):
    """What the client's function returned for ``call_id``."""

    model_config = _WIRE
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[InputText]
    id: str | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")] | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")],
    _by_type(_ITEM_TAGS, "message", "input items must be message, function_call or function_call_output "
                                    "(built-in tool calls, reasoning and item references are not supported)")]


# -- tools and text format (function_tool.py, tool_choice_function.py, response_text_config.py) ------------


class FunctionTool(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]


class FormatText(BaseModel):
    model_config = _WIRE
    type: Literal["text"]


class FormatJSONObject(BaseModel):
    model_config = _WIRE
    type: Literal["json_object"]


class FormatJSONSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["json_schema"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[FormatText | FormatJSONObject | FormatJSONSchema, Field(discriminator="type")]


class TextConfig(BaseModel):
    model_config = _WIRE
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Dropped: a hint to OpenAI's models.")


class Reasoning(BaseModel):
    """``effort`` is forwarded as chat's ``reasoning_effort`` (vLLM hands it to reasoning models' templates)."""

    model_config = _WIRE
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: None = None


# -- the request ------------------------------------------------------------------------------------

# Fields accepted with their neutral value only, and what to do instead.
NEUTRAL_ONLY = {
    "background": "background mode is not supported: wait for the answer, or stream it",
    "truncation": "the gateway never drops conversation items: send 'disabled' or leave it out",
    "conversation": "conversation objects are not supported: chain turns with previous_response_id",
    "prompt": "prompt templates are stored at OpenAI: send instructions and input instead",
    "max_tool_calls": "max_tool_calls applies to built-in tools, which the gateway does not run: leave it out",
    "top_logprobs": "logprobs are not returned by /v1/responses: use /v1/chat/completions on a vllm expert",
}


class ResponsesRequest(BaseModel):
    """Body of ``POST /v1/responses`` (``response_create_params.py``)."""

    model_config = _WIRE

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Annotated[list[InputItem], Field(min_length=1, description=(
        "A string (one user message) or a list of input items."))]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    # accepted and dropped (OpenAI-platform fields)
    user: Annotated[str, Field(max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    stream_options: dict[str, bool] | None = None
    include: list[str] | None = None
    # neutral values only
    background: Literal[False] | None = None
    truncation: Literal["disabled"] | None = None
    conversation: None = None
    prompt: None = None
    max_tool_calls: None = None
    top_logprobs: Literal[0] | None = None

    @field_validator(*NEUTRAL_ONLY, mode="before")
    @classmethod
    def _neutral_only(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in (None, False, 0, "disabled"):
            raise ValueError(NEUTRAL_ONLY[info.field_name or ""])
        return v

    @field_validator("input", mode="before")
    @classmethod
    def _string_is_one_user_message(cls, v: Any) -> Any:
        return [{"type": "message", "role": "user", "content": v}] if isinstance(v, str) else v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, v: Any) -> Any:
        for tool in v if isinstance(v, list) else ():
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tool type {kind!r} is not supported: the gateway serves function tools "
                                 "(type 'function') only; built-in tools such as web_search need OpenAI")
        return v

    @field_validator("include")
    @classmethod
    def _no_logprobs(cls, v: list[str] | None) -> list[str] | None:
        if v and "message.output_text.logprobs" in v:
            raise ValueError("message.output_text.logprobs is not supported by /v1/responses here; "
                             "use /v1/chat/completions with logprobs on a vllm expert")
        return v



# -- the response object and its output items (response.py, response_output_*.py) -------------------------


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseError(BaseModel):
    """Why a response failed: ``code`` is one of the API's codes (``server_error``, ``rate_limit_exceeded``)."""

    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    """The response object (``object: "response"``); ``output_text`` is the SDKs' own convenience property."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    usage: Usage | None = None
    user: str | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputItemList(BaseModel):
    """``GET /v1/responses/{id}/input_items`` (``response_item_list.py``): items carry ids."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# -- stream events (response_*_event.py), in the order they are sent ---------------------------------------


class Event(BaseModel):
    type: str
    sequence_number: int


class ResponseEvent(Event):
    """response.created | response.in_progress | response.completed | response.incomplete | response.failed"""

    response: ResponseObject


class OutputItemEvent(Event):
    """response.output_item.added | response.output_item.done"""

    output_index: int
    item: OutputItem


class ItemEvent(Event):
    """An event about one output item."""

    item_id: str
    output_index: int


class PartEvent(ItemEvent):
    """An event about one content part of an output message."""

    content_index: int


class ContentPartEvent(PartEvent):
    """response.content_part.added | response.content_part.done"""

    part: OutputText


class TextDeltaEvent(PartEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class TextDoneEvent(PartEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ArgumentsDeltaEvent(ItemEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    delta: str


class ArgumentsDoneEvent(ItemEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    name: str
    arguments: str
