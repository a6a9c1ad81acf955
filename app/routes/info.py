"""The routes around generation: health, metrics, the model list, and (de)tokenizing as vLLM serves it."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.engine.request import out_of_vocabulary
from app.errors import bad_request
from app.lifecycle import ServerState
from app.protocol.requests import DetokenizeRequest, TokenizeRequest
from app.protocol.responses import (
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from app.protocol.token_text import spelled_out, token_text
from app.routes.body import read_body
from app.routes.generation import off_the_loop, server_state
from app.routes.openapi_docs import error_responses, request_body

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
router = APIRouter()


def get_and_head(path: str, **kwargs: Any) -> Callable[[Endpoint], Endpoint]:
    """GET, and HEAD wherever GET answers (RFC 9110; load balancers often probe with HEAD). HEAD stays
    out of the OpenAPI document, where it would repeat GET's operation."""

    def register(endpoint: Endpoint) -> Endpoint:
        router.add_api_route(path, endpoint, methods=["GET"], **kwargs)
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, **kwargs)
        return endpoint

    return register


@get_and_head("/health", summary="200 when ready to serve, else 503 with the phase")
async def health(request: Request) -> JSONResponse:
    status, body = server_state(request).health()
    return JSONResponse(body, status_code=status)


@get_and_head(
    "/health/live",
    summary="Liveness: 200 while loading, serving or draining; 503 only when the process can no longer serve "
    "(engine dead or stalled, model failed) and should be restarted",
)
async def health_live(request: Request) -> JSONResponse:
    status, body = server_state(request).liveness()
    return JSONResponse(body, status_code=status)


@get_and_head("/slots", summary="What each KV-cache slot holds: its request, or the prefix it keeps for the next one")
async def slots(request: Request) -> dict[str, Any]:
    state = server_state(request)
    engine = state.require_engine()
    return engine.slots_snapshot()


@get_and_head("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@get_and_head("/v1/models", response_model=ModelList, responses=error_responses(503))
async def models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    state.require_engine()
    return ModelList(data=[state.model_card()]).model_dump()


@get_and_head("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(404, 503))
async def model(request: Request, model_id: str) -> dict[str, Any]:
    state = server_state(request)
    state.require_engine()
    state.check_model(model_id)
    return state.model_card().model_dump()


@router.post(
    "/tokenize",
    openapi_extra=request_body(TokenizeRequest),
    response_model=TokenizeResponse,
    responses=error_responses(400, 404, 503),
)
async def tokenize(request: Request) -> dict[str, Any]:
    body = await read_body(request, TokenizeRequest)
    state = server_state(request)
    tokenizer = state.require_loaded().tokenizer
    state.check_model(body.model)
    ids = await off_the_loop(tokenizer.encode, body.prompt, bos=state.add_bos and body.add_special_tokens, allow_special=True)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len).model_dump()


@router.post(
    "/detokenize",
    openapi_extra=request_body(DetokenizeRequest),
    response_model=DetokenizeResponse,
    responses=error_responses(400, 404, 503),
)
async def detokenize(request: Request) -> dict[str, Any]:
    body = await read_body(request, DetokenizeRequest)
    state = server_state(request)
    tokenizer = state.require_loaded().tokenizer
    state.check_model(body.model)
    for token_id in body.tokens:
        if not 0 <= token_id < tokenizer.vocab_size:
            error = out_of_vocabulary("tokens", token_id, tokenizer.vocab_size)
            raise bad_request(error.message, param=error.param)
    # Control tokens by name, as HF's decode (and so vLLM) writes them: /tokenize reads the text back to the same ids.
    return DetokenizeResponse(prompt=await off_the_loop(spelled_out, tokenizer, body.tokens)).model_dump()


@get_and_head("/tokenizer_info", response_model=TokenizerInfoResponse, responses=error_responses(503))
async def tokenizer_info(request: Request) -> dict[str, Any]:
    """vLLM's answer, as lm-evaluation-harness's RemoteTokenizer reads it. The Tokenizer protocol has
    no pad token: a `pad_id` attribute is used where a tokenizer has one."""
    state = server_state(request)
    return tokenizer_info_of(state).model_dump()


def tokenizer_info_of(state: ServerState) -> TokenizerInfoResponse:
    loaded = state.require_loaded()
    tokenizer = loaded.tokenizer
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = pad_id if isinstance(pad_id, int) and 0 <= pad_id < tokenizer.vocab_size else None
    return TokenizerInfoResponse(
        tokenizer_class=type(tokenizer).__name__,
        bos_token=token_text(tokenizer, tokenizer.bos_id),
        eos_token=token_text(tokenizer, tokenizer.eos_id),
        pad_token=token_text(tokenizer, pad_id),
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=pad_id,
        add_bos_token=state.add_bos,
        model_max_length=state.max_model_len,
        vocab_size=tokenizer.vocab_size,
        chat_template=loaded.chat_template,
    )
