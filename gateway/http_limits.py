"""Bounds on what a client may send before the app sees a request, enforced in uvicorn's HTTP protocol.

uvicorn's httptools protocol has no limit on the request line, the headers or the time a request takes to
arrive: one 100 MB header held the only event loop for seconds (httptools concatenates header pieces), and
a slowloris connection stayed open for ever. This subclass counts bytes and headers as they arrive and
refuses, in OpenAI's error shape, then closes:

- request target longer than ``server.max_url_bytes`` -> 414;
- request line + headers over ``server.max_header_bytes``, or more than ``server.max_headers`` -> 431
  (RFC 6585 §5);
- a request (head and body) not received within ``server.read_timeout_s`` of its first byte, or of the
  connection's opening -> 408 (RFC 9110 §15.5.9).

The refusal is written, the write side shut, and what the client still sends is discarded unread for
``LINGER_S`` before the socket closes, so the client reads the status instead of a reset (the "lingering
close" of RFC 9112 §9.6).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import ServerConfig
from gateway.errors import OpenAIError

LINGER_S = 1.0
_REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ServerConfig = ServerConfig()  # bound per server by ``protocol_for``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._header_bytes = 0
        self._headers = 0
        self._in_head = True
        self._refusal: OpenAIError | None = None
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None

    # -- the deadline ---------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()  # an answer is going out: nothing else can be said
            return
        self._refuse(OpenAIError(408, f"The request was not received within {self.limits.read_timeout_s:g} s; "
                                      "send it whole, faster.", "invalid_request_error", None, "request_timeout"))

    # -- uvicorn's protocol hooks -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and discard
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refusal is None and self._in_head and \
                self._head_bytes > self.limits.max_header_bytes + self.limits.max_url_bytes:
            self._refusal = self._too_large(431, f"Request headers exceed {self.limits.max_header_bytes} bytes.")
        if self._refusal is not None:
            self._refuse(self._refusal)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._header_bytes = self._headers = 0
        self._in_head = True
        self._arm()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if self._refusal is None and len(self.url) > self.limits.max_url_bytes:
            self._refusal = self._too_large(414, f"The request target exceeds {self.limits.max_url_bytes} bytes.")

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._headers += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._refusal is None and self._headers > self.limits.max_headers:
            self._refusal = self._too_large(431, f"More than {self.limits.max_headers} request headers.")
        elif self._refusal is None and self._header_bytes > self.limits.max_header_bytes:
            self._refusal = self._too_large(431, f"Request headers exceed {self.limits.max_header_bytes} bytes.")

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._refusal is None:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is None:
            self._disarm()
            super().on_message_complete()

    # -- refusing -------------------------------------------------------------------------------------
    @staticmethod
    def _too_large(status: int, message: str) -> OpenAIError:
        return OpenAIError(status, message, "invalid_request_error", None,
                           "uri_too_long" if status == 414 else "request_header_fields_too_large")

    def _refuse(self, err: OpenAIError) -> None:
        self._refused = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app (if it runs) sees the client gone and stops
            self.cycle.message_event.set()
        if self.transport.is_closing():
            return
        body = orjson.dumps(err.body())
        head = (f"HTTP/1.1 {err.status} {_REASONS[err.status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol_for(limits: ServerConfig) -> type[LimitedHttpToolsProtocol]:
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def uvicorn_config(app: Any, server: ServerConfig, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    """The one uvicorn configuration: ``octoroute serve`` and the test harness both serve with it."""
    return uvicorn.Config(app, host=host, port=port, http=protocol_for(server), timeout_keep_alive=server.keepalive_s,
                          log_level="warning", access_log=False, **kwargs)
