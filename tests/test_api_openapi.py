"""/openapi.json describes every route's request and response bodies; /docs serves the explorer."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from app.config import Settings
from app.server import create_app


def schema(api_key: str | None = None) -> tuple[TestClient, dict[str, Any]]:
    client = TestClient(create_app(Settings(warmup=False, api_key=api_key)))  # no lifespan: nothing loads
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return client, response.json()


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in all_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


def test_every_post_route_names_its_body_and_its_responses() -> None:
    _, doc = schema()
    posts = {path: ops["post"] for path, ops in doc["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    for path, op in posts.items():
        body = resolve(doc, op["requestBody"]["content"]["application/json"]["schema"])
        assert body["type"] == "object" and body["properties"], path
        ok = resolve(doc, op["responses"]["200"]["content"]["application/json"]["schema"])
        assert ok["properties"], path
        error = resolve(doc, op["responses"]["400"]["content"]["application/json"]["schema"])
        assert set(error["properties"]) == {"error"}, path


def test_generation_bodies_list_openai_fields_and_streams_name_their_chunk() -> None:
    _, doc = schema()
    schemas = doc["components"]["schemas"]
    assert {"model", "prompt", "max_tokens", "logprobs", "echo", "stream"} <= set(schemas["CompletionRequest"]["properties"])
    assert {"model", "messages", "max_completion_tokens", "top_logprobs"} <= set(schemas["ChatCompletionRequest"]["properties"])
    for path, chunk in (("/v1/completions", "CompletionChunk"), ("/v1/chat/completions", "ChatCompletionChunk")):
        stream = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        assert chunk in stream["x-event-schema"]["$ref"]
        assert {"id", "object", "created", "model", "choices"} <= set(schemas[chunk]["properties"])


def test_every_reference_resolves_and_get_routes_have_one_operation() -> None:
    _, doc = schema()
    names = set(doc["components"]["schemas"])
    assert all(ref.rsplit("/", 1)[1] in names for ref in all_refs(doc))
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert "head" not in {method for ops in doc["paths"].values() for method in ops}


def test_docs_and_schema_are_open_even_with_an_api_key() -> None:
    client, _ = schema(api_key="secret")
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert client.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 401


def bounds_keywords(node: Any, path: str = "") -> list[str]:
    """Where a schema carries pydantic's constraint names (ge, le, gt, lt) instead of JSON Schema's."""
    if isinstance(node, dict):
        own = [f"{path}.{k}" for k in ("ge", "le", "gt", "lt") if k in node and "type" in node]
        return own + [p for k, v in node.items() for p in bounds_keywords(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in bounds_keywords(v, f"{path}[{i}]")]
    return []


def test_integer_bounds_are_json_schema_keywords() -> None:
    """n, max_tokens, top_k, ... were served as `"ge": 1` (no such keyword): clients and schemathesis saw no bounds."""
    _, doc = schema()
    assert bounds_keywords(doc["components"]) == []
    properties = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 128} in properties["n"]["anyOf"]
    assert {"type": "integer", "minimum": 0} in properties["max_tokens"]["anyOf"]
