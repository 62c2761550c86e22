"""Reading and validating request bodies at the edge: size limit, Content-Encoding, JSON, UTF-8, the model.

Validation errors name the field as the API does (``messages[1].content``) and say what was expected in
a client developer's words, never pydantic's (``messages.1.content.str``, "Input should be ...").
"""

from __future__ import annotations

import zlib
from typing import Any, TypeVar

import brotli  # Google's reference Brotli bindings; >= 1.2 bounds the output of each step
import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import Request

from gateway.errors import OpenAIError, bad_request

M = TypeVar("M", bound=BaseModel)
ENCODINGS = ("gzip", "deflate", "br", "identity")  # what Content-Encoding may say (RFC 9110 §8.4.1)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body exceeds the limit of {limit} bytes (after decoding).",
                       "invalid_request_error", None, "request_too_large")


class _Decoder:
    """One Content-Encoding, decoded chunk by chunk without ever holding more than ``limit`` bytes out."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._zlib: Any = None
        self._br: Any = None
        if encoding == "br":
            self._br = brotli.Decompressor()
        elif encoding != "identity":
            self._zlib = zlib.decompressobj(31 if encoding == "gzip" else 15)

    def feed(self, data: bytes, room: int) -> bytes:
        """Decoded bytes of ``data``; at most ``room`` + 1 of them (one more than fits is enough to refuse)."""
        if self._br is not None:
            out = self._br.process(data, output_buffer_limit=room + 1)
            while len(out) <= room and not self._br.can_accept_more_data():
                out += self._br.process(b"", output_buffer_limit=room + 1 - len(out))
            return bytes(out)
        if self._zlib is not None:
            out = self._zlib.decompress(data, room + 1)
            while self._zlib.eof and self._zlib.unused_data and len(out) <= room:
                if self.encoding != "gzip":  # a gzip body may hold several members (RFC 1952 §2.2); others one
                    raise zlib.error("data after the end of the stream")
                rest, self._zlib = self._zlib.unused_data, zlib.decompressobj(31)
                out += self._zlib.decompress(rest, room + 1 - len(out))
            return bytes(out)
        return data

    def done(self) -> bool:
        if self._br is not None:
            return bool(self._br.is_finished())
        return self._zlib is None or bool(self._zlib.eof)


def _decoders(header: str | None) -> list[_Decoder]:
    """Decoders in the order to apply them (the reverse of the header's, RFC 9110 §8.4); 415 for others."""
    names = [n.strip().lower() for n in (header or "").split(",") if n.strip()]
    names = ["gzip" if n == "x-gzip" else n for n in names]
    unknown = [n for n in names if n not in ENCODINGS]
    if unknown:
        raise OpenAIError(415, f"Content-Encoding {unknown[0]!r} is not supported; send the body as it is, or "
                          f"encoded with one of: {', '.join(ENCODINGS[:3])}.", "invalid_request_error", None,
                          "unsupported_content_encoding")
    return [_Decoder(n) for n in reversed(names) if n != "identity"]


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON. ``limit`` bounds the bytes received and, separately, the decoded bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"Request body is {declared} bytes; the limit is {limit}.",
                          "invalid_request_error", None, "request_too_large")
    decoders = _decoders(request.headers.get("content-encoding"))
    received, body = 0, bytearray()
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        body += _decode(decoders, chunk, limit - len(body))
        if len(body) > limit:
            raise _too_large(limit)
    if not all(d.done() for d in decoders):
        raise bad_request(f"Request body is truncated {decoders[-1].encoding} data.", code="invalid_encoding")
    if not body:
        raise bad_request("Request body is empty; send a JSON object.")
    try:
        data = orjson.loads(body)  # rejects invalid UTF-8 and documents nested over 1,024 levels
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None
    try:
        # orjson re-encodes at most 254 levels, and the cache key / upstream body wrap the request in a few
        # more: refuse here what the gateway could not forward (else a 500 later, e.g. a deep `tools` schema).
        orjson.dumps([[[[data]]]])
    except orjson.JSONEncodeError:
        raise bad_request("Request body is nested too deeply.") from None
    return data


def _decode(decoders: list[_Decoder], chunk: bytes, room: int) -> bytes:
    for decoder in decoders:
        try:
            chunk = decoder.feed(chunk, room)
        except (zlib.error, brotli.error):
            raise bad_request(f"Request body is not valid {decoder.encoding} data, as its Content-Encoding says.",
                              code="invalid_encoding") from None
    return chunk


def parse(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise bad_request("Request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI requestBody for handlers that validate by hand (so errors keep OpenAI's shape).

    The schema itself is registered under components by ``gateway.app`` (see ``_openapi``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


# -- validation errors in the API's terms ---------------------------------------------------------------

_TYPE_WORDS: dict[str, str] = {
    "string_type": "a string", "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
    "bool_type": "a boolean", "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
    "list_type": "an array", "none_required": "null", "int_parsing": "an integer", "float_parsing": "a number",
    "bool_parsing": "a boolean", "string_sub_type": "a string",
}
_JSON_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"), (dict, "an object"),
    (type(None), "null"))


def _json_type(value: object) -> str:
    return next((word for kind, word in _JSON_TYPES if isinstance(value, kind)), "something else")


def api_path(loc: tuple[int | str, ...], client_named_last: bool = False) -> str:
    """pydantic's location as the API names it: ``("messages", 1, "content", "str")`` -> ``messages[1].content``.

    Union branches (``str``, ``list[...]``, ``function-after[...]``, ``constrained-str``) and
    dict-key markers are pydantic's, not the API's: they are left out. ``client_named_last``: the last part is
    a name the client sent (an unknown field), kept as sent whatever it looks like."""
    if client_named_last and loc:
        head = api_path(loc[:-1])
        return f"{head}.{loc[-1]}" if head else str(loc[-1])
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part.islower() and part not in ("str", "int", "float", "bool", "list",
                                                                      "dict", "none", "function"):
            out += f".{part}" if out else part
        elif part[:1].isdigit() and part.isdigit():  # a dict key such as a logit_bias token id
            out += f"[{part!r}]"
    return out


def _sentence(error: ErrorDetails, path: str) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return f"Missing required parameter: '{path}'."
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {path}"
    if kind in ("literal_error", "enum"):
        return f"Invalid value for '{path}': expected {ctx.get('expected')}, but got {error['input']!r} instead."
    if kind in _TYPE_WORDS:
        return (f"Invalid type for '{path}': expected {_TYPE_WORDS[kind]}, but got "
                f"{_json_type(error['input'])} instead.")
    message = error["msg"].removeprefix("Value error, ").replace(" after validation", "")
    for noun in ("Input ", "List ", "String ", "Dictionary "):  # pydantic's subject is the field itself
        if message.startswith(noun + "should "):
            message = message.removeprefix(noun)
    return f"Invalid value for '{path}': {message.rstrip('.')}."


def validation_error(errors: list[ErrorDetails]) -> OpenAIError:
    """One 400 for a failed validation, with ``param`` the API's field path.

    A value that matches none of a field's types gets one error per type from pydantic: when every error
    is such a type mismatch, the deepest wins (and those at its path merge into one "expected a string or
    an array" sentence); otherwise the deepest other error wins (the branch whose type matched says what is
    wrong inside it)."""
    specific = [e for e in errors if e["type"] not in _TYPE_WORDS]
    if specific:
        first = max(specific, key=lambda e: len(e["loc"]))  # max keeps the first of equals
        path = api_path(first["loc"], client_named_last=first["type"] == "extra_forbidden")
        return bad_request(_sentence(first, path), param=path or None)
    paths = [api_path(e["loc"]) for e in errors]
    deepest = max(range(len(errors)), key=lambda i: len(paths[i]))  # the branch that got furthest
    path = paths[deepest]
    words = list(dict.fromkeys(_TYPE_WORDS[e["type"]] for e, p in zip(errors, paths, strict=True) if p == path))
    message = (f"Invalid type for '{path}': expected {' or '.join(words)}, but got "
               f"{_json_type(errors[deepest]['input'])} instead.")
    return bad_request(message, param=path or None)
