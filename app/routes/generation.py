"""What both generation endpoints share: reading the request, OpenAI -> engine parameters, submitting
every choice (or none)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, TypeVar

from fastapi import Request

from app.engine import Engine, GenerationRequest
from app.engine.handle import OutputQueue
from app.errors import bad_request, from_engine_error
from app.lifecycle import ServerState
from app.protocol.requests import SamplingFields
from app.protocol.structured import StructuredError, grammar_of
from app.routes.body import read_body
from app.routes.choices import Choice, outcome
from model.checkpoint import LoadedModel
from model.grammar import GrammarError, GrammarMatcher, GrammarSpec
from model.sampling import SamplingParams

log = logging.getLogger("llamaserve")
GenerationBodyT = TypeVar("GenerationBodyT", bound=SamplingFields)
T = TypeVar("T")


async def off_the_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run tokenizer work (encode, chat rendering, decode) in a worker thread: a 4 MB prompt takes
    seconds to tokenize, and on the event loop it would stall /health and every stream meanwhile.
    (Tokenizers run no torch ops, so the worker threads start no OpenMP pools.)"""
    return await asyncio.to_thread(fn, *args, **kwargs)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def read_generation_request(
    request: Request, model: type[GenerationBodyT]
) -> tuple[GenerationBodyT, ServerState, Engine, LoadedModel]:
    """What both generation endpoints check first, in one order: the body, readiness, the model id."""
    body = await read_body(request, model)
    state = server_state(request)
    engine = state.require_engine()
    state.check_model(body.model)
    return body, state, engine, state.require_loaded()


async def output_grammar(
    body: SamplingFields, state: ServerState, spec: tuple[GrammarSpec, str] | None = None
) -> GrammarMatcher | None:
    """The compiled grammar the request's output must follow (structured outputs), or None.

    `spec` (a grammar and the field that asked for it) overrides the body's own fields: chat's tool
    calls pass theirs. Compiling runs in a worker thread (a big schema takes up to a second), so neither
    the event loop nor the engine waits; a bad grammar is a 400 that names the field.
    """
    try:
        found = spec or grammar_of(body)
    except StructuredError as e:
        raise bad_request(str(e), param=e.param) from e
    if found is None:
        return None
    grammar, field = found
    assert state.grammars is not None, "the model is loaded"
    try:
        return await off_the_loop(state.grammars.matcher, grammar)
    except GrammarError as e:
        raise bad_request(f"{field}: {e}", param=field.split(".")[0]) from e


def per_choice(grammar: GrammarMatcher | None, choice: int) -> GrammarMatcher | None:
    """Each choice advances its own grammar state."""
    return None if grammar is None else grammar if choice == 0 else grammar.copy()


def sampling_params(body: SamplingFields, *, logprobs: int | None, choice: int, vocab_size: int) -> SamplingParams:
    """SamplingParams of one choice; with a seed, choice i uses seed + i so n choices differ reproducibly.

    A top_k of the whole vocabulary or more means no top-k filter.
    """
    top_k = -1 if body.top_k is None or body.top_k >= vocab_size else body.top_k
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=body.token_bias(),
        seed=None if body.seed is None else body.seed + choice,
        logprobs=logprobs,
    )


def submit_choices(
    request: Request,
    engine: Engine,
    requests: list[tuple[int, GenerationRequest]],
    max_choices: int,
    prompt_param: str = "prompt",
) -> tuple[list[Choice], OutputQueue]:
    """Submit every choice, or none. `requests` holds (prompt index, engine request) pairs.

    All are validated before any is queued, so a bad one costs nothing. Each engine request is named
    after the response id (`cmpl-...`, with `-k` for choice k when there are several), so the engine's
    log lines and the response carry the same id. One request may ask for at most `max_choices`
    completions (prompts x n; --max-choices-per-request), and never more than the queue holds: a 400,
    not a 503 that clients would retry in vain.
    """
    rid: str = request.state.request_id
    limit = min(max_choices, engine.max_queue)
    if len(requests) > limit:
        raise bad_request(
            f"This request needs {len(requests)} completions (prompts x n), more than this server takes in one "
            f"request ({limit}); lower n or send fewer prompts per request.",
            param="n",
        )
    queue: OutputQueue = asyncio.Queue()
    choices: list[Choice] = []
    try:
        for _, generation in requests:
            engine.validate(generation)
        for k, (prompt_index, generation) in enumerate(requests):
            engine_id = rid if len(requests) == 1 else f"{rid}-{k}"
            handle = engine.submit(generation, request_id=engine_id, queue=queue, group=rid)
            choices.append(Choice(k, prompt_index, handle, generation.prompt_ids))
    except Exception as e:
        for choice in choices:
            choice.handle.cancel()
        raise (from_engine_error(e, prompt_param=prompt_param) or e) from e
    prompts = {p: len(g.prompt_ids) for p, g in requests}
    engine_ids = ", ".join(c.handle.request_id for c in choices[:4]) + (
        f", ... ({len(choices)} in all)" if len(choices) > 4 else ""
    )
    log.info(
        "%s: started as engine request(s) %s: %d prompt token(s), max_tokens %d",
        rid,
        engine_ids,
        sum(prompts.values()),
        requests[0][1].max_tokens,
    )
    request.state.outcome = outcome(choices)
    return choices, queue
