"""ASGI middleware, pure (no BaseHTTPMiddleware), so streaming and disconnects pass straight through:
request ids, the API key, the body size limit."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import APIError, internal_error
from app.protocol.responses import new_id

log = logging.getLogger("llamaserve")

# Never behind the API key: probes, scrapers, docs, and the playground's page and assets (the page asks for the key;
# what it reads and generates goes through the key like any client's).
OPEN_PATHS = (
    "/health",
    "/health/live",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/",
    "/playground/playground.js",
    "/playground/playground.css",
)
REQUEST_ID_HEADER = "x-request-id"
GENERATION_ID_PREFIX = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}  # POST path -> id prefix
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's x-request-id we echo and log; others are ignored


async def send_error(send: Send, error: APIError, close: bool = False) -> None:
    """Answer with `error` before the app runs; `close` ends the connection (its request is unread)."""
    response = error.response()
    if close:
        response.headers["connection"] = "close"
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}


def declared_length(headers: Headers) -> int | None:
    """The Content-Length a request declares (0 if none), or None when the header is not a plain number.

    h11 answers a malformed header with 400 before the app runs, but another ASGI server or an in-process
    client may pass one on: str.isdigit() accepts "²" and "٣", which int() refuses, and int() refuses
    more than 4300 digits; both were 500s. 20 digits or more are past any limit, so not converted.
    """
    length = headers.get("content-length")
    if length is None:
        return 0
    if not (length.isascii() and length.isdigit()):
        return None
    return int(length) if len(length) < 20 else 2**64


class BodyLimitMiddleware:
    """Reject bodies over max_bytes with 413 and bodies not complete within read_timeout seconds with
    408, in the envelope; the body is read once and replayed. (A body that never ends would otherwise
    hold its connection and up to max_bytes of memory forever.)"""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float = 30.0) -> None:
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"Request body too large (limit {self.max_bytes} bytes).", code="request_too_large")
        declared = declared_length(Headers(scope=scope))
        if declared is None:
            bad = APIError(400, "The Content-Length header must be a decimal number.", code="invalid_content_length")
            return await send_error(send, bad, close=True)
        if declared > self.max_bytes:
            return await send_error(send, too_large)
        chunks: list[bytes] = []
        size, more = 0, True
        try:
            async with asyncio.timeout(self.read_timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
                    if size > self.max_bytes:
                        return await send_error(send, too_large)
        except TimeoutError:
            slow = APIError(408, f"The request body did not arrive within {self.read_timeout:g} s.", code="request_timeout")
            return await send_error(send, slow, close=True)
        body, replayed = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class APIKeyMiddleware:
    """Require `Authorization: Bearer <key>` (constant-time compare) except on the open paths."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        error = APIError(
            401,
            "Incorrect API key provided. Send it as `Authorization: Bearer <key>`.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await send_error(send, error)


def client_request_id(value: str | None) -> str | None:
    """A client's x-request-id when it is safe to put in a response id, a header and a log line, else None."""
    return value if value is not None and SAFE_REQUEST_ID.fullmatch(value) else None


class RequestIdMiddleware:
    """Give each generation request its response id and send it back as `x-request-id` on every response.

    The id is the body's `id` (`cmpl-...` / `chatcmpl-...`): like vLLM, a client's `X-Request-Id` becomes
    the part after the prefix, but only when it is short and plain (SAFE_REQUEST_ID), else a random hex
    id is used. Routes read it as `request.state.request_id`. Outermost, so 401/413 answers carry it too;
    an unexpected exception becomes the 500 envelope here (with the header) instead of in Starlette's
    outer error middleware. Logs one line when the request ends, under the id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        prefix = GENERATION_ID_PREFIX.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if prefix is None:
            return await self.app(scope, receive, send)
        rid = new_id(prefix, client_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER)))
        scope.setdefault("state", {})["request_id"] = rid
        status: int | None = None
        start = time.monotonic()

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status is not None:
                raise
            log.exception("%s: unhandled error", rid)
            await internal_error().response()(scope, receive, send_with_id)
        finally:
            summary = scope["state"].get("outcome")
            log.info(
                "%s: finished with status %s in %.3f s%s",
                rid,
                status if status is not None else "none (no response)",
                time.monotonic() - start,
                f" ({summary()})" if summary else "",
            )
