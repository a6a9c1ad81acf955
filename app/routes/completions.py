"""POST /v1/completions: prompts (text or token ids, one or many) x n choices, plain JSON or SSE."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.engine import GenerationOutput, GenerationRequest
from app.errors import bad_request
from app.lifecycle import ServerState
from app.protocol.logprobs import LegacyLogprobs, merge_logprobs
from app.protocol.requests import CompletionRequest
from app.protocol.responses import CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionResponse, now
from app.protocol.token_text import spelled_out
from app.routes.choices import Choice, usage_of, wire_finish_reason
from app.routes.generation import (
    off_the_loop,
    output_grammar,
    per_choice,
    read_generation_request,
    sampling_params,
    submit_choices,
)
from app.routes.openapi_docs import generation_responses, request_body
from app.streaming import CLIENT_CLOSED_REQUEST, SSEResponse, abort_all, collect, sse, sse_stream
from model.tokenizer import Tokenizer

router = APIRouter()


@router.post(
    "/v1/completions",
    openapi_extra=request_body(CompletionRequest),
    responses=generation_responses(CompletionResponse, CompletionChunk),
    summary="Create a completion",
)
async def completions(request: Request) -> Response:
    body, state, engine, loaded = await read_generation_request(request, CompletionRequest)
    tokenizer = loaded.tokenizer
    prompts = await off_the_loop(encode_prompts, body, tokenizer, state.add_bos)
    grammar = await output_grammar(body, state)
    requests = [
        (
            p,
            GenerationRequest(
                prompt_ids=ids,
                sampling=sampling_params(body, logprobs=body.logprobs, choice=i, vocab_size=tokenizer.vocab_size),
                max_tokens=body.max_tokens_or_default(),
                stop=list(body.stop or []),
                stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=bool(body.ignore_eos),
                min_tokens=body.min_tokens or 0,
                prompt_logprobs=bool(body.echo) and body.logprobs is not None,
                grammar=per_choice(grammar, p * (body.n or 1) + i),
            ),
        )
        for p, ids in enumerate(prompts)
        for i in range(body.n or 1)
    ]
    choices, queue = submit_choices(request, engine, requests, state.settings.max_choices_per_request)
    if body.echo:  # after validation: only ids inside the vocabulary can be spelled out
        texts = [text if isinstance(text, str) else await off_the_loop(spelled_out, tokenizer, text) for text in body.prompts()]
        for choice in choices:
            choice.echo_text = texts[choice.prompt_index]
    rid, created = request.state.request_id, now()
    if body.stream:
        writer = CompletionStream(choices, body, state, rid, created)
        stream = sse_stream(writer, choices, queue, state.metrics, state.settings.keepalive_s, rid)
        return SSEResponse(stream, on_close=lambda: abort_all(choices, state.metrics))
    if not await collect(choices, queue, request, state.metrics):
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(completion_response(choices, body, state, rid, created))


def encode_prompts(body: CompletionRequest, tokenizer: Tokenizer, add_bos: bool) -> list[list[int]]:
    """Token ids per prompt; text is encoded with control tokens recognised, ids pass as they are (the
    engine checks them against the vocabulary)."""
    prompts = body.prompts()
    if not prompts:
        raise bad_request("prompt must not be empty", param="prompt")
    out = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise bad_request(f"prompt {i} is {'empty' if isinstance(prompt, str) else 'an empty token list'}", param="prompt")
        out.append(tokenizer.encode(prompt, bos=add_bos, allow_special=True) if isinstance(prompt, str) else list(prompt))
    return out


def choice_logprobs(c: Choice, tokenizer: Tokenizer) -> CompletionLogprobs:
    """A whole choice's legacy logprobs: the echoed prompt's, then the generated tokens'."""
    builder = LegacyLogprobs(tokenizer, c.echo_text)
    echoed = [builder.prompt(c.prompt_ids, c.prompt_logprobs, c.echo_text)] if c.echo_text else []
    return merge_logprobs(*echoed, builder.generated(c.logprobs, c.text_offsets))


def completion_response(
    choices: list[Choice], body: CompletionRequest, state: ServerState, rid: str, created: int
) -> dict[str, Any]:
    tokenizer = state.tokenizer
    out = [
        CompletionChoice(
            text=c.echo_text + "".join(c.text),
            index=c.index,
            logprobs=choice_logprobs(c, tokenizer) if body.logprobs is not None else None,
            finish_reason=wire_finish_reason(c.finish_reason),
        )
        for c in choices
    ]
    return CompletionResponse(id=rid, created=created, model=state.model_name, choices=out, usage=usage_of(choices)).model_dump()


class CompletionStream:
    """SSE events of a completion: the echo with the first output, then text deltas, a usage chunk if asked."""

    def __init__(self, choices: list[Choice], body: CompletionRequest, state: ServerState, rid: str, created: int) -> None:
        self.choices, self.body, self.state, self.rid, self.created = choices, body, state, rid, created
        self.tokenizer = state.tokenizer
        self.include_usage = body.include_usage()
        self.echo_pending = {c.index for c in choices if c.echo_text}

    def start(self) -> list[str]:
        return []

    def output(self, c: Choice, out: GenerationOutput) -> list[str]:
        text, logprobs = out.text, None
        echo = c.index in self.echo_pending  # the prompt goes out with the first output (it carries prompt logprobs)
        if echo:
            self.echo_pending.discard(c.index)
            text = c.echo_text + text
        if self.body.logprobs is not None:
            builder = LegacyLogprobs(self.tokenizer, c.echo_text)
            parts = [builder.prompt(c.prompt_ids, out.prompt_logprobs, c.echo_text)] if echo else []
            logprobs = merge_logprobs(*parts, builder.generated(out.logprobs or [], out.text_offsets))
        if not (text or out.finish_reason or (logprobs is not None and logprobs.tokens)):
            return []
        choice = CompletionChoice(text=text, index=c.index, logprobs=logprobs, finish_reason=out.finish_reason)
        return [sse(self._chunk([choice]))]

    def end(self) -> list[str]:
        return [sse(self._chunk([], usage=True))] if self.include_usage else []

    def _chunk(self, choices: list[CompletionChoice], usage: bool = False) -> dict[str, Any]:
        chunk = CompletionChunk(
            id=self.rid,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=usage_of(self.choices) if usage else None,
        )
        return chunk.model_dump(exclude=None if self.include_usage else {"usage"})
