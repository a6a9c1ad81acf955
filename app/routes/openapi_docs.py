"""How the routes describe themselves in /openapi.json.

The generation routes parse their bodies themselves (one JSON pass, 415 for other media types, errors
in the OpenAI envelope), so FastAPI cannot infer their schemas: each route names its request model
here, and `install_schemas` puts every named model into components.schemas.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from app.protocol.responses import ErrorResponse

REF = "#/components/schemas/{model}"
_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = []  # the models routes name but FastAPI cannot see


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route whose JSON body is `model`."""
    _MODELS.append((model, "validation"))
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": "An error in the OpenAI envelope"} for status in statuses}


def generation_responses(response: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """200 as JSON or, with stream: true, as SSE events whose `data:` is `chunk` (then `[DONE]`)."""
    _MODELS.append((chunk, "serialization"))
    stream = {
        "schema": {"type": "string", "description": f"SSE events: data: {chunk.__name__} JSON ... data: [DONE]"},
        "x-event-schema": {"$ref": REF.format(model=chunk.__name__)},
    }
    return {
        200: {
            "model": response,
            "description": "The completion (JSON), or SSE events when stream is true",
            "content": {"text/event-stream": stream},
        },
        **error_responses(400, 401, 404, 413, 415, 503),
    }


def install_schemas(app: FastAPI) -> None:
    """Serve an OpenAPI document that includes the hand-parsed request bodies and stream chunks."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema(_MODELS, ref_template=REF)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
