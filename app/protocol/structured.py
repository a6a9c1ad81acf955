"""Structured-output fields of a request -> the one grammar its output must follow (model/grammar.py).

OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
"schema", "strict"}}), and what self-hosted clients send to vLLM: `structured_outputs` ({"json",
"regex", "choice", "grammar", "json_object"}) and the older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`. A request names at most one; anything else is a 400 here, before the
grammar is compiled (app/routes/generation.py) and long before the 200.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from model.grammar import GrammarSpec

# vLLM's backend selectors and whitespace knobs: accepted and ignored (there is one engine, compact JSON).
IGNORED_EXTRAS = ("guided_decoding_backend", "guided_whitespace_pattern")


class StructuredError(ValueError):
    """A structured-output field this server cannot honour; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Lenient):
    name: StrictStr = "response"
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Lenient):
    """vLLM's StructuredOutputsParams (the fields an engine outside vLLM can honour)."""

    json_: dict[str, Any] | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None
    structural_tag: Any = None


def _schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    """A schema given as an object or as JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise StructuredError(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise StructuredError(f"{param} must be a JSON Schema object", param)
    return value


def grammar_of(body: Any) -> tuple[GrammarSpec, str] | None:
    """The grammar a generation request asks for and the field that asked (its top-level name is the
    error's param), or None.

    `body` is a SamplingFields: response_format, structured_outputs and the guided_* fields.
    """
    found: list[tuple[GrammarSpec, str]] = []
    fmt: ResponseFormat | None = getattr(body, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append((GrammarSpec("json_object"), "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise StructuredError(
                "response_format of type json_schema needs json_schema.schema (a JSON Schema object)", "response_format"
            )
        found.append((GrammarSpec("json_schema", fmt.json_schema.schema_), "response_format"))
    outputs: StructuredOutputs | None = getattr(body, "structured_outputs", None)
    if outputs is not None:
        if outputs.structural_tag is not None:
            raise StructuredError("structured_outputs.structural_tag is not supported", "structured_outputs")
        if outputs.json_ is not None:
            found.append(
                (GrammarSpec("json_schema", _schema(outputs.json_, "structured_outputs.json")), "structured_outputs.json")
            )
        if outputs.regex is not None:
            found.append((GrammarSpec("regex", outputs.regex), "structured_outputs.regex"))
        if outputs.choice is not None:
            found.append((GrammarSpec("choice", outputs.choice), "structured_outputs.choice"))
        if outputs.grammar is not None:
            found.append((GrammarSpec("grammar", outputs.grammar), "structured_outputs.grammar"))
        if outputs.json_object:
            found.append((GrammarSpec("json_object"), "structured_outputs.json_object"))
    if getattr(body, "guided_json", None) is not None:
        found.append((GrammarSpec("json_schema", _schema(body.guided_json, "guided_json")), "guided_json"))
    if getattr(body, "guided_regex", None) is not None:
        found.append((GrammarSpec("regex", body.guided_regex), "guided_regex"))
    if getattr(body, "guided_choice", None) is not None:
        found.append((GrammarSpec("choice", body.guided_choice), "guided_choice"))
    if getattr(body, "guided_grammar", None) is not None:
        found.append((GrammarSpec("grammar", body.guided_grammar), "guided_grammar"))
    if len(found) > 1:
        names = ", ".join(dict.fromkeys(param for _, param in found))
        raise StructuredError(
            f"a request may constrain its output one way only; this one uses {names}", found[1][1].split(".")[0]
        )
    return found[0] if found else None
