"""Plain ASGI middleware at the HTTP edge (no extra task per request, streaming untouched).

- ``HttpConventions``: ``HEAD`` on every ``GET`` endpoint (load balancers, uptime probes; RFC 9110
  §9.3.2), and a trailing slash served as the path without it (``POST /v1/chat/completions/``) rather than
  a 307 redirect built from the Host header, which clients drop the body on.
- ``OpsGuard``: with ``auth.protect_ops``, the operational endpoints need a key too.
- ``RequestIdMiddleware``: every request gets an id (the client's ``x-request-id`` if sane), echoed back.
- ``ErrorBoundary``: an unhandled exception answers 500 in OpenAI's shape *and keeps the connection*;
  Starlette's own handler re-raises after answering, and uvicorn then closes the client's keep-alive
  connection.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import OpenAIError
from gateway.serving import error_response, new_request_id

log = logging.getLogger("octoroute.app")

# Open without a key unless auth.protect_ops: what probes and scrapers read (/health always stays open).
OPS_PATHS = frozenset({"/metrics", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class HttpConventions:
    """``HEAD`` as ``GET`` without a body; a trailing slash served as the path without it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            stripped = path.rstrip("/") or "/"
            scope = {**scope, "path": stripped, "raw_path": stripped.encode()}
        if scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class OpsGuard:
    """With ``protect``, ``OPS_PATHS`` answer 401 without a valid key, as the API endpoints do."""

    def __init__(self, app: ASGIApp, protect: bool) -> None:
        self.app = app
        self.protect = protect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.protect and scope["type"] == "http" and scope["path"] in OPS_PATHS:
            state = getattr(scope["app"].state, "octoroute", None)
            try:
                if state is not None:
                    state.auth.check_request(Headers(scope=scope))
            except OpenAIError as err:
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ErrorBoundary:
    """The last resort: an exception nothing else handled becomes a 500 in OpenAI's shape on a kept connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error", extra={"request_id": scope.get("state", {}).get("request_id")})
            if started:  # half a response is out: only closing the connection can tell the client
                raise
            err = OpenAIError(500, "Internal gateway error; the request id identifies it in the logs.",
                              "server_error", None, "internal_error")
            await error_response(err)(scope, receive, send)


class RequestIdMiddleware:
    """Gives every HTTP request an id (the client's ``x-request-id`` if sane) and echoes it back.

    Plain ASGI rather than BaseHTTPMiddleware: no extra task per request, streaming untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = new_request_id(incoming)
        scope.setdefault("state", {})["request_id"] = request_id
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", raw_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)
