"""POST /v1/chat/completions: messages rendered with the model's chat format, n choices, JSON or SSE."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.engine import GenerationOutput, GenerationRequest
from app.errors import bad_request
from app.lifecycle import ServerState
from app.protocol.logprobs import chat_logprobs
from app.protocol.requests import ChatCompletionRequest
from app.protocol.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    now,
)
from app.routes.choices import Choice, usage_of, wire_finish_reason
from app.routes.generation import off_the_loop, read_generation_request, sampling_params, submit_choices
from app.routes.openapi_docs import generation_responses, request_body
from app.streaming import CLIENT_CLOSED_REQUEST, SSEResponse, abort_all, collect, sse, sse_stream
from model.chat import ChatFormatError, end_of_turn_ids, render_chat
from model.checkpoint import LoadedModel

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    openapi_extra=request_body(ChatCompletionRequest),
    responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk),
    summary="Create a chat completion",
)
async def chat_completions(request: Request) -> Response:
    body, state, engine, loaded = await read_generation_request(request, ChatCompletionRequest)
    tokenizer = loaded.tokenizer
    prompt_ids = await off_the_loop(chat_prompt, body, loaded, state)
    max_tokens = body.requested_max_tokens()
    if max_tokens is None:  # up to the context; a prompt that fills it fails the engine's length check
        max_tokens = max(state.max_model_len - len(prompt_ids), 1)
    end_of_turn = [] if body.ignore_eos else sorted(end_of_turn_ids(state.chat_format, tokenizer))
    top = (body.top_logprobs or 0) if body.logprobs else None
    requests = [
        (
            0,
            GenerationRequest(
                prompt_ids=prompt_ids,
                sampling=sampling_params(body, logprobs=top, choice=i, vocab_size=tokenizer.vocab_size),
                max_tokens=max_tokens,
                stop=list(body.stop or []),
                stop_token_ids=list(body.stop_token_ids or []) + end_of_turn,
                ignore_eos=bool(body.ignore_eos),
                min_tokens=body.min_tokens or 0,
            ),
        )
        for i in range(body.n or 1)
    ]
    choices, queue = submit_choices(request, engine, requests, state.settings.max_choices_per_request, prompt_param="messages")
    rid, created = request.state.request_id, now()
    if body.stream:
        writer = ChatStream(choices, body, state, rid, created)
        stream = sse_stream(writer, choices, queue, state.metrics, state.settings.keepalive_s, rid)
        return SSEResponse(stream, on_close=lambda: abort_all(choices, state.metrics))
    if not await collect(choices, queue, request, state.metrics):
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(chat_response(choices, body, state, rid, created))


def chat_prompt(body: ChatCompletionRequest, loaded: LoadedModel, state: ServerState) -> list[int]:
    try:
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        return render_chat(messages, loaded.tokenizer, state.chat_format, default_system=state.default_system)
    except (ChatFormatError, ValueError) as e:
        raise bad_request(str(e), param="messages") from e


def chat_response(
    choices: list[Choice], body: ChatCompletionRequest, state: ServerState, rid: str, created: int
) -> dict[str, Any]:
    tokenizer = state.tokenizer
    out = []
    for c in choices:
        logprobs = ChatLogprobs(content=chat_logprobs(tokenizer, c.logprobs, body.top_logprobs or 0)) if body.logprobs else None
        message = AssistantMessage(content="".join(c.text))
        out.append(
            ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=wire_finish_reason(c.finish_reason))
        )
    response = ChatCompletionResponse(id=rid, created=created, model=state.model_name, choices=out, usage=usage_of(choices))
    return response.model_dump()


class ChatStream:
    """SSE events of a chat completion: a role delta per choice, content deltas, `{}` with the finish_reason."""

    def __init__(self, choices: list[Choice], body: ChatCompletionRequest, state: ServerState, rid: str, created: int) -> None:
        self.choices, self.body, self.state, self.rid, self.created = choices, body, state, rid, created
        self.tokenizer = state.tokenizer
        self.include_usage = body.include_usage()

    def start(self) -> list[str]:
        return [self._event(c.index, ChatDelta(role="assistant", content="")) for c in self.choices]

    def output(self, c: Choice, out: GenerationOutput) -> list[str]:
        events, logprobs = [], None
        if self.body.logprobs and out.logprobs:
            logprobs = ChatLogprobs(content=chat_logprobs(self.tokenizer, out.logprobs, self.body.top_logprobs or 0))
        if out.text or logprobs is not None:
            events.append(self._event(c.index, ChatDelta(content=out.text), logprobs))
        if out.finish_reason is not None:
            events.append(self._event(c.index, ChatDelta(), finish=out.finish_reason))
        return events

    def end(self) -> list[str]:
        if not self.include_usage:
            return []
        last = ChatCompletionChunk(
            id=self.rid, created=self.created, model=self.state.model_name, choices=[], usage=usage_of(self.choices)
        )
        return [sse(last.model_dump())]

    def _event(self, index: int, delta: ChatDelta, logprobs: ChatLogprobs | None = None, finish: str | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.rid,
            created=self.created,
            model=self.state.model_name,
            choices=[ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)],
        )
        return sse(chunk.model_dump(exclude=None if self.include_usage else {"usage"}))
