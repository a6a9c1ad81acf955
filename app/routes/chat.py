"""POST /v1/chat/completions: messages rendered with the model's chat format, n choices, JSON or SSE.

With tools, the tool list is written into the prompt and each choice's text goes through a
ToolCallParser (model/tool_calls.py) into content and `tool_calls`; tool_choice "required" or a named
function constrains the output with a grammar of calls, so its arguments always parse.
"""

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
    FunctionCall,
    ToolCallOut,
    now,
)
from app.protocol.structured import StructuredError, grammar_of
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
from model.chat import ChatFormatError, end_of_turn_ids, render_chat
from model.checkpoint import LoadedModel
from model.grammar import GrammarSpec
from model.tool_calls import ParsedEvent, ToolCall, ToolCallParser, forced_call_grammar, prepare_messages, tool_style

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
    grammar = await output_grammar(body, state, tool_grammar(body, state))
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
                grammar=per_choice(grammar, i),
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
        messages: list[dict[str, Any]] = []
        for i, m in enumerate(body.messages):
            message: dict[str, Any] = {"role": m.role, "content": m.text(i)}
            if m.tool_calls:
                message["tool_calls"] = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls]
            messages.append(message)
        style = tool_style(state.chat_format)
        messages, default_system = prepare_messages(messages, body.active_tools(), style, state.default_system)
        return render_chat(messages, loaded.tokenizer, state.chat_format, default_system=default_system)
    except (ChatFormatError, ValueError) as e:
        raise bad_request(str(e), param="messages") from e


def tool_grammar(body: ChatCompletionRequest, state: ServerState) -> tuple[GrammarSpec, str] | None:
    """The grammar of a forced call (tool_choice "required" or a named function), or None; a request may
    not also ask for a response_format then."""
    forced = body.forced_tools()
    if forced is None:
        return None
    try:
        other = grammar_of(body)
    except StructuredError as e:
        raise bad_request(str(e), param=e.param) from e
    if other is not None:
        raise bad_request(
            f"tool_choice {'required' if body.tool_choice == 'required' else 'naming a function'} already constrains "
            f"the output; it cannot be combined with {other[1]}",
            param="tool_choice",
        )
    lark = forced_call_grammar(forced, tool_style(state.chat_format), parallel=body.parallel_tool_calls is not False)
    return GrammarSpec("grammar", lark), "tools"


def tool_parser(body: ChatCompletionRequest, state: ServerState) -> ToolCallParser | None:
    tools = body.active_tools()
    return ToolCallParser(tools, tool_style(state.chat_format)) if tools else None


def finish_reason_of(reason: str | None, calls: list[ToolCall]) -> str:
    """ "tool_calls" when the model ended by calling tools; otherwise as without tools."""
    wire = wire_finish_reason(reason)
    return "tool_calls" if calls and wire == "stop" else wire


def tool_call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def chat_response(
    choices: list[Choice], body: ChatCompletionRequest, state: ServerState, rid: str, created: int
) -> dict[str, Any]:
    tokenizer = state.tokenizer
    out = []
    for c in choices:
        logprobs = ChatLogprobs(content=chat_logprobs(tokenizer, c.logprobs, body.top_logprobs or 0)) if body.logprobs else None
        text, calls = "".join(c.text), []
        parser = tool_parser(body, state)
        if parser is not None:
            events = parser.feed(text) + parser.finish()
            calls = parser.calls
            text = "".join(e.content for e in events)
        message = AssistantMessage(
            content=(text.strip() or None) if calls else text, tool_calls=[tool_call_out(t) for t in calls] or None
        )
        finish = finish_reason_of(c.finish_reason, calls)
        out.append(ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=finish))
    response = ChatCompletionResponse(id=rid, created=created, model=state.model_name, choices=out, usage=usage_of(choices))
    return response.model_dump()


class ChatStream:
    """SSE events of a chat completion: a role delta per choice, content deltas, `{}` with the finish_reason."""

    def __init__(self, choices: list[Choice], body: ChatCompletionRequest, state: ServerState, rid: str, created: int) -> None:
        self.choices, self.body, self.state, self.rid, self.created = choices, body, state, rid, created
        self.tokenizer = state.tokenizer
        self.include_usage = body.include_usage()
        self.parsers = {c.index: tool_parser(body, state) for c in choices}

    def start(self) -> list[str]:
        return [self._event(c.index, ChatDelta(role="assistant", content="")) for c in self.choices]

    def output(self, c: Choice, out: GenerationOutput) -> list[str]:
        events, logprobs = [], None
        if self.body.logprobs and out.logprobs:
            logprobs = ChatLogprobs(content=chat_logprobs(self.tokenizer, out.logprobs, self.body.top_logprobs or 0))
        parser = self.parsers[c.index]
        if parser is None:
            if out.text or logprobs is not None:
                events.append(self._event(c.index, ChatDelta(content=out.text), logprobs))
        else:
            parsed = parser.feed(out.text) + (parser.finish() if out.finish_reason is not None else [])
            events += self._parsed(c.index, parsed, logprobs, len(parser.calls) - sum(e.call is not None for e in parsed))
        if out.finish_reason is not None:
            finish = finish_reason_of(out.finish_reason, parser.calls if parser is not None else [])
            events.append(self._event(c.index, ChatDelta(), finish=finish))
        return events

    def _parsed(self, index: int, parsed: list[ParsedEvent], logprobs: ChatLogprobs | None, first_call: int) -> list[str]:
        """Content deltas, and per tool call a delta with its id and name then one with its arguments.
        This step's logprobs ride on the first delta (an empty content delta if the text is held back)."""
        events = []
        call_index = first_call
        for item in parsed:
            if item.call is None:
                events.append(self._event(index, ChatDelta(content=item.content), logprobs))
            else:
                head = {
                    "index": call_index,
                    "id": item.call.id,
                    "type": "function",
                    "function": {"name": item.call.name, "arguments": ""},
                }
                events.append(self._event(index, ChatDelta(tool_calls=[head]), logprobs))
                arguments = {"index": call_index, "function": {"arguments": item.call.arguments}}
                events.append(self._event(index, ChatDelta(tool_calls=[arguments])))
                call_index += 1
            logprobs = None
        if logprobs is not None:
            events.append(self._event(index, ChatDelta(content=""), logprobs))
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
