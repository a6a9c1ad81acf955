"""The OpenAI error envelope, everywhere: `{"error": {"message", "type", "param", "code"}}`.

Clients (the openai SDK above all) pick their exception class from the status and read this body, so
every failure, including FastAPI's own 404/405/422 and unexpected crashes, leaves in this shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.request import ContextLengthExceeded, EngineDraining, EngineOverloaded, InvalidRequest
from app.quoting import excerpt

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see as it is (status, OpenAI type, param, code, extra headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported_media_type(content_type: str) -> APIError:
    return APIError(415, f"Content-Type must be application/json, got {excerpt(content_type)}.", code="unsupported_media_type")


def model_not_found(model: str) -> APIError:
    shown = model if len(model) <= 100 else f"{model[:100]}... ({len(model)} characters)"  # OpenAI's wording, bounded
    return APIError(404, f"The model `{shown}` does not exist.", param="model", code="model_not_found")


def unavailable(message: str, *, code: str, retry_after: int = 1) -> APIError:
    """503 with Retry-After: the SDK retries it, honouring the header."""
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after)})


def internal_error() -> APIError:
    return APIError(500, "The server had an error while processing your request.", type="server_error")


def from_engine_error(exc: Exception, *, prompt_param: str = "prompt") -> APIError | None:
    """The APIError for an engine exception (overload, context overflow, bad ids); None if not one of them."""
    if isinstance(exc, EngineDraining):
        return unavailable("The server is shutting down.", code="server_draining", retry_after=5)
    if isinstance(exc, EngineOverloaded):
        return unavailable(str(exc) or "The server is at capacity; retry shortly.", code="server_overloaded")
    if isinstance(exc, ContextLengthExceeded):
        what = "messages" if prompt_param == "messages" else "prompt"
        advice = f" Please reduce the length of the {what} or the completion."
        return bad_request(exc.describe(what) + advice, param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        param = getattr(exc, "param", None)
        return bad_request(str(exc), param="messages" if param == "prompt" and prompt_param == "messages" else param)
    return None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the offending parameter's dotted path."""
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {first.get('msg', 'invalid JSON')}.", None
    param = _where(first) or _blamed(first)
    messages = []
    for err in errors[:3]:
        where, text = _where(err), str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        line = f"{where}: {text}" if where else text
        if line not in messages:
            messages.append(line)
    return "Invalid request: " + "; ".join(messages), param


def _blamed(error: Any) -> str | None:
    """The parameter a cross-field check names (protocol.FieldError carries it), else None."""
    return getattr((error.get("ctx") or {}).get("error"), "param", None)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _where(error: Any) -> str:
    """Dotted location of a pydantic error without "body" and union-member tags ("list[int]", "str")."""
    parts = [str(p) for p in error.get("loc", ()) if p != "body"]
    return ".".join(p for p in parts if "[" not in p and p not in _TYPE_TAGS and not p.startswith("function-"))


def request_id_of(request: Request) -> str | None:
    """The response id the server gave this request (generation requests only; see app/server.py)."""
    return getattr(request.state, "request_id", None)


def log_rejected(request: Request, error: APIError) -> None:
    """One log line for a generation request answered with an error, under its request id."""
    rid = request_id_of(request)
    if rid is not None:
        log.info("%s: rejected with %d %s: %s", rid, error.status, error.code or error.type, error.message)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI/Starlette can raise into the envelope (never a 422, never a traceback)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        log_rejected(request, exc)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        error = bad_request(message, param=param)
        log_rejected(request, error)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
        elif exc.status_code == 405:
            message, code = f"Method {request.method} is not allowed for {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return APIError(exc.status_code, message, type=kind, code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error().response()
