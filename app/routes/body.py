"""Reading a request body: one JSON parse straight into the wire model, every failure a clear 4xx."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.errors import bad_request, unsupported_media_type

BodyT = TypeVar("BodyT", bound=BaseModel)


def is_json_media_type(content_type: str | None) -> bool:
    """application/json or any +json type; a missing header counts as JSON (as FastAPI does)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, model: type[BodyT]) -> BodyT:
    """Parse and validate in one pass (pydantic's JSON parser); errors become 400s via the handlers.

    Other Content-Types get 415: a web page may POST text/plain or a form cross-site without a CORS
    preflight (CVE-2021-32677), and would burn compute. The parser refuses what Python's json would
    let through to a crash later: lone surrogate escapes (no tokenizer can encode them), integers
    past any sane size, and nesting deeper than a few hundred levels.
    """
    if not is_json_media_type(request.headers.get("content-type")):
        raise unsupported_media_type(request.headers["content-type"])
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        errors = e.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise bad_request(unparsable_message(str(errors[0].get("msg", "")))) from None
        raise RequestValidationError(errors) from None


def unparsable_message(detail: str) -> str:
    """What went wrong with a body that is not JSON we take, in words a client can act on."""
    if "recursion limit" in detail:
        return "The JSON body of your request is nested too deeply."
    if "number out of range" in detail:
        return "A number in the JSON body of your request has too many digits."
    # jiter says "lone leading surrogate" for a lone \udc00-\udfff, but "unexpected end of hex escape" for
    # a \ud800-\udbff not followed by its \u pair (a cut emoji, the common case); a short \u12 is "invalid escape".
    if "surrogate" in detail or "end of hex escape" in detail:
        return "The request contains invalid Unicode text (a lone surrogate escape)."
    return f"We could not parse the JSON body of your request: {detail.removeprefix('Invalid JSON: ')}."
