"""Responses API ⇄ Chat Completions: the translation that lets every expert serve ``/v1/responses``.

Input items become chat messages (OpenAI's own mapping, as in its "migrate to Responses" guide):

- ``message`` → ``{"role", "content": text}`` (developer stays developer; content parts joined);
- consecutive ``function_call`` items → one assistant message with ``tool_calls`` (merged into the assistant
  message right before them, the way a chat model writes text and calls in one turn);
- ``function_call_output`` → ``{"role": "tool", "tool_call_id", "content"}``.

A chat completion's choice becomes output items: a ``message`` with one ``output_text`` part when there is
text, then one ``function_call`` per tool call. ``finish_reason`` ``length`` / ``content_filter`` make the
response ``incomplete`` (``max_output_tokens`` / ``content_filter``). Usage: prompt → input tokens,
completion → output tokens.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from gateway.endpoints.responses.protocol import (
    FunctionCall,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    IncompleteDetails,
    ItemStatus,
    MessageItem,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    Usage,
)
from gateway.errors import bad_request
from router_model import Message

ChatMessage = dict[str, Any]
Item = dict[str, Any]
INCOMPLETE: dict[str, Literal["max_output_tokens", "content_filter"]] = {
    "length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    """OpenAI-style object id: ``resp_…``, ``msg_…``, ``fc_…`` followed by 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


def stored_items(req: ResponsesRequest) -> list[Item]:
    """The request's input items as ``GET …/input_items`` lists them: every item with an id and a status."""
    items: list[Item] = []
    for item in req.input:
        if isinstance(item, MessageItem):
            part = "output_text" if item.role == "assistant" else "input_text"
            content = [{"type": part, "text": item.content}] if isinstance(item.content, str) else [
                p.model_dump(exclude_none=True) for p in item.content]
            items.append({"id": item.id or new_id("msg"), "type": "message", "role": item.role,
                          "content": content, "status": item.status or "completed"})
        else:
            prefix = "fc" if isinstance(item, FunctionCallItem) else "fco"
            items.append({**item.model_dump(exclude_none=True), "id": item.id or new_id(prefix),
                          "status": item.status or "completed"})
    return items


def chat_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """The request's input items as chat messages (without the instructions)."""
    messages: list[ChatMessage] = []
    for item in req.input:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


def check_tool_outputs(conversation: list[ChatMessage]) -> None:
    """Every function_call_output answers a function_call earlier in the conversation (the API refuses others)."""
    calls: set[str] = set()
    for message in conversation:
        calls.update(c["id"] for c in message.get("tool_calls") or ())
        if message["role"] == "tool" and message["tool_call_id"] not in calls:
            raise bad_request(f"No tool call found for function call output with call_id "
                              f"{message['tool_call_id']!r}; send the function_call item before its output "
                              "or chain with previous_response_id.", param="input")


def router_view(conversation: list[ChatMessage]) -> list[Message]:
    """What routing looks at: every turn's text (a tool call by its name and arguments)."""
    out: list[Message] = []
    for m in conversation:
        text = m.get("content") or " ".join(f"{c['function']['name']}({c['function']['arguments']})"
                                            for c in m.get("tool_calls") or ())
        out.append(Message(m["role"], text))
    return out


def chat_body(req: ResponsesRequest, conversation: list[ChatMessage]) -> dict[str, Any]:
    """The chat-completions body the pipeline forwards (only what the client set)."""
    body: dict[str, Any] = {"model": req.model, "messages": conversation, "stream": req.stream}
    optional: dict[str, Any] = {"max_tokens": req.max_output_tokens, "temperature": req.temperature,
                                "top_p": req.top_p}
    if req.reasoning is not None:
        optional["reasoning_effort"] = req.reasoning.effort
    body.update({k: v for k, v in optional.items() if v is not None})
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice if isinstance(req.tool_choice, str) else {
            "type": "function", "function": {"name": req.tool_choice.name}}
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
            by_alias=True, exclude={"type"}, exclude_none=True)}
    return body


# Chat-completions field names the pipeline's refusals use, and what the client called them.
RESPONSES_PARAM = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


def skeleton(req: ResponsesRequest, response_id: str, model: str) -> ResponseObject:
    """The response object before any output: what ``response.created`` carries."""
    tools: list[FunctionTool] = req.tools or []
    choice = req.tool_choice
    return ResponseObject(
        id=response_id, created_at=int(time.time()), status="in_progress", instructions=req.instructions,
        max_output_tokens=req.max_output_tokens, metadata=req.metadata or {}, model=model,
        parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
        store=req.store, temperature=req.temperature, top_p=req.top_p, user=req.user,
        text=req.text.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else
        {"format": {"type": "text"}},
        tool_choice="auto" if choice is None else choice if isinstance(choice, str) else choice.model_dump(),
        tools=[t.model_dump(exclude_none=True) for t in tools])


def usage(chat_usage: dict[str, Any] | None) -> Usage | None:
    if not chat_usage:
        return None
    prompt, completion = int(chat_usage.get("prompt_tokens") or 0), int(chat_usage.get("completion_tokens") or 0)
    return Usage(input_tokens=prompt, output_tokens=completion,
                 total_tokens=int(chat_usage.get("total_tokens") or prompt + completion))


def finish(response: ResponseObject, finish_reason: str | None, chat_usage: dict[str, Any] | None) -> None:
    """Set the final status (completed / incomplete with its reason) and usage."""
    reason = INCOMPLETE.get(finish_reason or "")
    response.status = "incomplete" if reason else "completed"
    response.incomplete_details = IncompleteDetails(reason=reason) if reason else None
    response.usage = usage(chat_usage)


def output_items(message: dict[str, Any], status: ItemStatus = "completed") -> list[OutputItem]:
    """A chat completion's assistant message as output items."""
    items: list[OutputItem] = []
    if message.get("content"):
        items.append(OutputMessage(id=new_id("msg"), status=status,
                                   content=[OutputText(text=message["content"], logprobs=[])]))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        items.append(FunctionCall(id=new_id("fc"), call_id=call.get("id") or new_id("call"), name=fn.get("name", ""),
                                  arguments=fn.get("arguments") or "", status="completed"))
    return items


def assistant_turn(output: list[OutputItem]) -> list[ChatMessage]:
    """A response's output as the chat messages a follow-up turn (``previous_response_id``) continues from."""
    text = "".join(p.text for item in output if isinstance(item, OutputMessage) for p in item.content)
    calls = [{"id": i.call_id, "type": "function", "function": {"name": i.name, "arguments": i.arguments}}
             for i in output if isinstance(i, FunctionCall)]
    if not text and not calls:
        return []
    message: ChatMessage = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]
