"""The FastAPI app: OpenAI-compatible routes over the engine, plus health, metrics and (de)tokenize.

`create_app(settings, loaded=None)` builds one app. The model loads in the background after start-up
(or is injected by tests), then a short warm-up generation runs, then /health turns 200. Every choice
of a request is submitted to the engine before the response starts, so all validation errors are
plain 4xx responses; after the 200 of a stream, errors travel as an SSE `error` event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.engine import Engine, GenerationOutput, GenerationRequest, RequestHandle
from app.errors import (
    APIError,
    bad_request,
    excerpt,
    from_engine_error,
    install_error_handlers,
    internal_error,
    model_not_found,
    unavailable,
    unsupported_media_type,
)
from app.metrics import Metrics
from app.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    Usage,
    LegacyLogprobs,
    chat_logprobs,
    merge_logprobs,
    new_id,
    now,
)
from model.chat import ChatFormatError, default_system_prompt, detect_chat_format, end_of_turn_ids, render_chat
from model.checkpoint import CheckpointError, LoadedModel
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer

log = logging.getLogger("llamaserve")
BodyT = TypeVar("BodyT", bound=BaseModel)
T = TypeVar("T")
GenerationBodyT = TypeVar("GenerationBodyT", bound=SamplingFields)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it
STALL_S = 120.0  # an engine with work that has not finished a step for this long is reported unhealthy
OPEN_PATHS = ("/health", "/metrics")  # never behind the API key (probes, scrapers)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
REQUEST_ID_HEADER = "x-request-id"
GENERATION_ID_PREFIX = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}  # POST path -> id prefix
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's x-request-id we echo and log; others are ignored


# --------------------------------------------------------------------------------------------------
# Model loading and the server's life: loading -> ready -> draining -> stopped (or failed)
# --------------------------------------------------------------------------------------------------


async def run_in_short_lived_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a thread that exits when done (unlike asyncio.to_thread's pooled workers).

    Every live thread that ran a parallel torch op keeps its own OpenMP pool; with two pools on a small
    machine libgomp throttles spin-waiting, which made the engine thread's decode ~1.7x slower.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=target, name="llamaserve-load", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def load_checkpoint(settings: Settings) -> LoadedModel:
    """Load the configured checkpoint (the embedded default model, fetched if absent, when none is set)."""
    from model.checkpoint import load_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    path = settings.model
    if path is None:
        from model.fetch import ensure_default_model

        path = str(ensure_default_model())
    log.info("loading %s on %s (%s)", path, settings.resolved_device(), settings.resolved_dtype())
    start = time.monotonic()
    loaded = load_model(
        path,
        device=settings.resolved_device(),
        dtype=settings.resolved_dtype(),
        max_batch_size=settings.max_batch_size,
        max_seq_len=settings.max_seq_len,
        quantization=settings.quantization,
        batch_invariant=settings.batch_invariant,
    )
    log.info("loaded %s in %.1f s (quantization %s, batch invariant %s)", loaded.name, time.monotonic() - start,
             loaded.quantization, loaded.model.batch_invariant)
    return loaded


class ServerState:
    """The model, the engine and the phase of one app; what every route reads."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None) -> None:
        self.settings = settings
        self.loaded = loaded
        self.engine: Engine | None = None
        self.phase = "loading"
        self.error: str | None = None
        self.metrics = Metrics()
        self.created = now()
        self.ready = asyncio.Event()
        self.on_failure: Callable[[], None] | None = None  # the CLI exits the process
        self._drained: asyncio.Task[None] | None = None
        self.model_name = ""
        self.chat_format = "chatml"
        self.default_system: str | None = None
        self.add_bos = False
        self.max_model_len = 0
        self._stall_watch: tuple[float | None, float] | None = None  # (last step seen busy, since when)

    async def start(self) -> None:
        """Load (in a thread, so /health answers meanwhile), start the engine, warm up, then report ready."""
        try:
            if self.loaded is None:
                self.loaded = await run_in_short_lived_thread(load_checkpoint, self.settings)
            self._configure(self.loaded)
            model = self.loaded.model
            self.engine = Engine(
                model,
                self.loaded.tokenizer,
                max_batch_size=model.max_batch_size,
                max_seq_len=model.max_seq_len,
                max_queue=self.settings.max_queue,
                prefill_chunk=self.settings.prefill_chunk,
            )
            self.engine.start()
            self.metrics.bind(self.engine.stats)
            if self.settings.warmup:
                await self._warmup()
            self.phase = "ready"
            self.ready.set()
            log.info("ready: serving %s (chat format %s, %d slots x %d tokens)", self.model_name, self.chat_format,
                     model.max_batch_size, model.max_seq_len)
        except Exception as e:  # noqa: BLE001 - any load failure must surface in /health and the log
            if isinstance(e, (CheckpointError, OSError)):
                log.error("start-up failed: %s", e)  # the user's mistake: no traceback
            else:
                log.exception("start-up failed")
            self.phase, self.error = "failed", f"{type(e).__name__}: {e}"
            if self.on_failure is not None:
                self.on_failure()

    def _configure(self, loaded: LoadedModel) -> None:
        tokenizer = loaded.tokenizer
        self.model_name = self.settings.served_model_name or loaded.name
        self.chat_format = self.settings.chat_format or detect_chat_format(loaded.chat_template, tokenizer)
        self.default_system = default_system_prompt(loaded.chat_template) if self.chat_format == "chatml" else None
        explicit_bos = getattr(tokenizer, "add_bos", None)
        self.add_bos = bool(explicit_bos) if explicit_bos is not None else self.chat_format in ("llama3", "llama2")
        self.add_bos = self.add_bos and tokenizer.bos_id is not None
        self.max_model_len = loaded.model.max_seq_len

    def model_card(self) -> ModelCard:
        """/v1/models' entry, with the numeric mode evaluation users need to know they are in."""
        loaded = self.require_loaded()
        return ModelCard(
            id=self.model_name,
            created=self.created,
            max_model_len=self.max_model_len,
            quantization=loaded.quantization,
            batch_invariant=bool(getattr(loaded.model, "batch_invariant", False)),
        )

    async def _warmup(self) -> None:
        """One tiny generation so the first real request does not pay for lazy initialisation."""
        assert self.engine is not None and self.loaded is not None
        start = time.monotonic()
        ids = self.loaded.tokenizer.encode("Hello") or [0]
        handle = self.engine.submit(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(temperature=0.0), max_tokens=2))
        async for _ in handle:
            pass
        log.info("warm-up generation took %.2f s", time.monotonic() - start)

    def require_engine(self) -> Engine:
        """The engine when ready to take requests, else a 503 saying why."""
        if self.phase == "ready" and self.engine is not None:
            return self.engine
        if self.phase == "loading":
            raise unavailable("The model is still loading; retry shortly.", code="model_loading", retry_after=5)
        if self.phase == "failed":
            raise unavailable(f"The model failed to load: {self.error}", code="model_load_failed", retry_after=30)
        raise unavailable("The server is shutting down.", code="server_draining", retry_after=5)

    def require_loaded(self) -> LoadedModel:
        self.require_engine()
        assert self.loaded is not None
        return self.loaded

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise model_not_found(name)

    async def drain(self) -> None:
        """Stop admitting (503 draining), let running requests finish up to the drain timeout, cancel the rest."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drained)

    async def _drain(self) -> None:
        if self.phase != "failed":
            self.phase = "draining"
        self.ready.clear()
        if self.engine is not None:
            log.info("draining: waiting up to %.0f s for running requests", self.settings.drain_timeout)
            await self.engine.drain(self.settings.drain_timeout)
            await asyncio.to_thread(self.engine.shutdown)
            log.info("engine stopped")
        if self.phase == "draining":
            self.phase = "stopped"

    def _stalled(self, stats: Any) -> bool:
        """True when the engine has had work but no finished step for STALL_S, as seen by health checks.

        Timed from when a check first saw work with this last step, not from the last step itself: after
        a long idle spell the first step of new work is not a stall.
        """
        if not (stats.running or stats.waiting):
            self._stall_watch = None
            return False
        now_ = time.monotonic()
        if self._stall_watch is None or self._stall_watch[0] != stats.last_step_time:
            self._stall_watch = (stats.last_step_time, now_)
        return now_ - self._stall_watch[1] > STALL_S

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.phase == "ready" and self.engine is not None:
            stats = self.engine.stats()
            if not stats.healthy or self._stalled(stats):
                return 503, {"status": "unhealthy"}
            return 200, {"status": "ok"}
        body: dict[str, Any] = {"status": "draining" if self.phase == "stopped" else self.phase}
        if self.error:
            body["error"] = self.error
        return 503, body


# --------------------------------------------------------------------------------------------------
# ASGI middleware (pure ASGI: no BaseHTTPMiddleware, so streaming and disconnects pass through)
# --------------------------------------------------------------------------------------------------


async def send_error(send: Send, error: APIError) -> None:
    response = error.response()
    await response({"type": "http"}, _no_receive, send)  # type: ignore[arg-type]


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class BodyLimitMiddleware:
    """Reject bodies over max_bytes with 413 in the envelope; the body is read once and replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"Request body too large (limit {self.max_bytes} bytes).", code="request_too_large")
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, too_large)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await send_error(send, too_large)
        body, replayed = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class APIKeyMiddleware:
    """Require `Authorization: Bearer <key>` (constant-time compare) except on the open paths."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        error = APIError(
            401,
            "Incorrect API key provided. Send it as `Authorization: Bearer <key>`.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await send_error(send, error)


# --------------------------------------------------------------------------------------------------
# Turning OpenAI requests into engine requests
# --------------------------------------------------------------------------------------------------


def client_request_id(value: str | None) -> str | None:
    """A client's x-request-id when it is safe to put in a response id, a header and a log line, else None."""
    return value if value is not None and SAFE_REQUEST_ID.fullmatch(value) else None


class RequestIdMiddleware:
    """Give each generation request its response id and send it back as `x-request-id` on every response.

    The id is the body's `id` (`cmpl-...` / `chatcmpl-...`): like vLLM, a client's `X-Request-Id` becomes
    the part after the prefix, but only when it is short and plain (SAFE_REQUEST_ID), else a random hex
    id is used. Routes read it as `request.state.request_id`. Outermost, so 401/413 answers carry it too;
    an unexpected exception becomes the 500 envelope here (with the header) instead of in Starlette's
    outer error middleware. Logs one line when the request ends, under the id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        prefix = GENERATION_ID_PREFIX.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if prefix is None:
            return await self.app(scope, receive, send)
        rid = new_id(prefix, client_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER)))
        scope.setdefault("state", {})["request_id"] = rid
        status: int | None = None
        start = time.monotonic()

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status is not None:
                raise
            log.exception("%s: unhandled error", rid)
            await internal_error().response()(scope, receive, send_with_id)
        finally:
            summary = scope["state"].get("outcome")
            log.info("%s: finished with status %s in %.3f s%s", rid, status if status is not None else "none (no response)",
                     time.monotonic() - start, f" ({summary()})" if summary else "")


def request_id(request: Request) -> str:
    """The response id RequestIdMiddleware gave this generation request."""
    return request.state.request_id  # type: ignore[no-any-return]


def describe_submitted(rid: str, handles: list[RequestHandle], prompt_tokens: int, max_tokens: int) -> None:
    """The request-start log line: ties the response id to the engine's own request ids."""
    engine_ids = ", ".join(h.request_id for h in handles[:4]) + (f", ... ({len(handles)} in all)" if len(handles) > 4 else "")
    log.info("%s: started as engine request(s) %s: %d prompt token(s), max_tokens %d", rid, engine_ids, prompt_tokens,
             max_tokens)


def outcome(choices: list[Choice]) -> Callable[[], str]:
    """What the request-end log line says about the choices (read when the response has been sent)."""

    def text() -> str:
        reasons = ", ".join(c.finish_reason or "unfinished" for c in choices[:4]) + (", ..." if len(choices) > 4 else "")
        return f"finish_reason {reasons}; {sum(c.num_generated_tokens for c in choices)} completion token(s)"

    return text


@dataclass
class Choice:
    """One choice of a response: its engine handle and everything it has produced so far."""

    index: int
    prompt_index: int
    handle: RequestHandle
    prompt_ids: list[int]
    echo_text: str = ""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    last_output_at: float | None = None

    def add(self, out: GenerationOutput, metrics: Metrics) -> None:
        """Fold one engine output in, recording inter-token gaps and, at the end, the request's metrics."""
        at = time.monotonic()
        if out.token_ids and self.last_output_at is not None:
            gap = (at - self.last_output_at) / len(out.token_ids)
            metrics.observe_tokens([gap] * len(out.token_ids))
        if out.token_ids:
            self.last_output_at = at
        self.text.append(out.text)
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_generated_tokens = out.num_generated_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            metrics.observe_finished(out.finish_reason, out.num_prompt_tokens, out.num_generated_tokens, out.timings)

    def abort(self, metrics: Metrics) -> None:
        """Cancel the engine request if it has not finished (client gone, stream closed); counted once."""
        self.handle.cancel()
        if self.finish_reason is None:
            self.finish_reason = "abort"  # internal only: never serialised
            metrics.observe_finished("abort", self.num_prompt_tokens, self.num_generated_tokens, None)


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


def is_json_media_type(content_type: str | None) -> bool:
    """application/json or any +json type; a missing header counts as JSON (as FastAPI does)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, model: type[BodyT]) -> BodyT:
    """Parse a JSON body; errors become 400s. Other Content-Types get 415: a web page may POST
    text/plain or a form cross-site without a CORS preflight (CVE-2021-32677), and would burn compute."""
    if not is_json_media_type(request.headers.get("content-type")):
        raise unsupported_media_type(request.headers["content-type"])
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}.") from None
    except ValueError:  # an integer past Python's 4,300-digit limit (not a JSONDecodeError)
        raise bad_request("A number in the JSON body of your request has too many digits.") from None
    except RecursionError:
        raise bad_request("The JSON body of your request is nested too deeply.") from None
    try:  # JSON may escape a lone surrogate ("\\ud800"): no tokenizer can encode that text
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("The request contains invalid Unicode text (a lone surrogate escape).") from None
    except RecursionError:
        raise bad_request("The JSON body of your request is nested too deeply.") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def check_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise bad_request(f"{param} contains token id {excerpt(bad[0])}, outside the vocabulary [0, {vocab_size})", param=param)


def check_sampling_ids(body: SamplingFields, vocab_size: int) -> None:
    check_ids(list(body.token_bias()), vocab_size, "logit_bias")
    check_ids(list(body.stop_token_ids or []), vocab_size, "stop_token_ids")


async def read_generation_request(
    request: Request, model: type[GenerationBodyT], state: ServerState
) -> tuple[GenerationBodyT, Engine, LoadedModel]:
    """What both generation endpoints check, in one order: body, readiness, model id, token ids."""
    body = await read_body(request, model)
    engine = state.require_engine()
    state.check_model(body.model)
    loaded = state.require_loaded()
    check_sampling_ids(body, loaded.tokenizer.vocab_size)
    return body, engine, loaded


def submit_all(engine: Engine, requests: list[GenerationRequest], prompt_param: str = "prompt") -> list[RequestHandle]:
    """Submit every choice, or none: on a failure the earlier handles are cancelled and the error raised.

    More choices than the queue holds cannot be admitted (all are queued before the engine takes any): a 400,
    not a 503 that clients would retry in vain.
    """
    capacity = engine.max_queue
    if len(requests) > capacity:
        raise bad_request(
            f"This request needs {len(requests)} completions (prompts x n), more than this server can take at once "
            f"({capacity}); lower n or send fewer prompts per request.",
            param="n",
        )
    handles: list[RequestHandle] = []
    try:
        for request in requests:
            handles.append(engine.submit(request))
    except Exception as e:
        for handle in handles:
            handle.cancel()
        raise (from_engine_error(e, prompt_param=prompt_param) or e) from e
    return handles


async def collect(choices: list[Choice], request: Request, metrics: Metrics) -> bool:
    """Drain every handle into its Choice; False (all cancelled) if the client went away first."""

    async def pump(choice: Choice) -> None:
        async for out in choice.handle:
            choice.add(out, metrics)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S)
            if pending and await request.is_disconnected():
                log.info("%s: client disconnected: cancelling %d choice(s)", request_id(request), len(choices))
                return False
        for task in tasks:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return True
    finally:
        for choice, task in zip(choices, tasks):
            task.cancel()
            choice.abort(metrics)


class SSEResponse(StreamingResponse):
    """An SSE stream that always runs its cleanup (cancel the handles), however the stream ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


async def merged_outputs(
    choices: list[Choice], keepalive_s: float
) -> AsyncIterator[tuple[Choice, GenerationOutput] | None]:
    """Outputs of all choices as they come (None = send a keep-alive); raises an engine failure."""
    queue: asyncio.Queue[tuple[Choice, GenerationOutput | BaseException | None]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for out in choice.handle:
                await queue.put((choice, out))
        except Exception as e:  # noqa: BLE001 - forwarded to the stream as an error event
            await queue.put((choice, e))
        finally:
            await queue.put((choice, None))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            try:
                choice, item = await asyncio.wait_for(queue.get(), timeout=keepalive_s)
            except asyncio.TimeoutError:
                yield None
                continue
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()


def error_event(exc: BaseException, rid: str) -> str:
    api = exc if isinstance(exc, APIError) else from_engine_error(exc) if isinstance(exc, Exception) else None
    if api is None:
        log.error("%s: stream failed after the response started: %r", rid, exc)
        api = internal_error()
    else:
        log.info("%s: stream ended with an error event: %d %s", rid, api.status, api.message)
    return sse(api.body())


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, loaded: LoadedModel | None = None) -> FastAPI:
    """One app with its own engine and metrics registry; `loaded` skips checkpoint loading (tests)."""
    settings = settings or Settings()
    state = ServerState(settings, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.ensure_future(state.start())
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
            await state.drain()

    app = FastAPI(  # no trailing-slash redirects: an unknown path is a 404 in the envelope, as OpenAI answers
        title="llamaserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )
    app.state.server = state
    install_error_handlers(app)
    # Outermost last: CORS answers preflights, then the key is checked before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],  # so browser clients can read it
        )
    app.add_middleware(RequestIdMiddleware)

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers often probe with HEAD
    async def health() -> JSONResponse:
        status, body = state.health()
        return JSONResponse(body, status_code=status)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])  # HEAD answers wherever GET does (RFC 9110)
    async def models() -> dict[str, Any]:
        state.require_engine()
        return ModelList(data=[state.model_card()]).model_dump()

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str) -> dict[str, Any]:
        state.require_engine()
        state.check_model(model_id)
        return state.model_card().model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request, TokenizeRequest)
        loaded = state.require_loaded()
        state.check_model(body.model)
        ids = loaded.tokenizer.encode(body.prompt, bos=state.add_bos and body.add_special_tokens, allow_special=True)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request, DetokenizeRequest)
        loaded = state.require_loaded()
        state.check_model(body.model)
        check_ids(body.tokens, loaded.tokenizer.vocab_size, "tokens")
        # Control tokens by name, as HF's decode (and so vLLM) writes them: /tokenize reads the text back to the same ids.
        return DetokenizeResponse(prompt=spelled_out(loaded.tokenizer, body.tokens)).model_dump()

    @app.api_route("/tokenizer_info", methods=["GET", "HEAD"])
    async def tokenizer_info() -> dict[str, Any]:
        loaded = state.require_loaded()
        return tokenizer_info_of(loaded, state.add_bos, state.max_model_len).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, engine, loaded = await read_generation_request(request, CompletionRequest, state)
        tokenizer = loaded.tokenizer
        n, echo, max_tokens = body.n or 1, bool(body.echo), body.max_tokens_or_default()
        prompts = completion_prompts(body, loaded, state.add_bos)
        requests, meta = [], []
        for p, (ids, echo_text) in enumerate(prompts):
            for i in range(n):
                requests.append(
                    GenerationRequest(
                        prompt_ids=ids,
                        sampling=sampling_params(body, logprobs=body.logprobs, choice=i, vocab_size=tokenizer.vocab_size),
                        max_tokens=max_tokens,
                        stop=list(body.stop or []),  # type: ignore[arg-type]
                        stop_token_ids=list(body.stop_token_ids or []),
                        ignore_eos=bool(body.ignore_eos),
                        min_tokens=body.min_tokens or 0,
                        prompt_logprobs=echo and body.logprobs is not None,
                    )
                )
                meta.append((p, ids, echo_text if echo else ""))
        handles = submit_all(engine, requests)
        choices = [Choice(k, p, h, ids, echo_text) for k, ((p, ids, echo_text), h) in enumerate(zip(meta, handles))]
        completion_id, created = request_id(request), now()
        describe_submitted(completion_id, handles, sum(len(ids) for ids, _ in prompts), max_tokens)
        request.state.outcome = outcome(choices)
        if body.stream:
            stream = stream_completion(choices, body, state, completion_id, created)
            return SSEResponse(stream, on_close=lambda: abort_all(choices, state.metrics))
        if not await collect(choices, request, state.metrics):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(completion_response(choices, body, state, completion_id, created))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body, engine, loaded = await read_generation_request(request, ChatCompletionRequest, state)
        tokenizer = loaded.tokenizer
        prompt_ids = chat_prompt(body, loaded, state)
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = state.max_model_len - len(prompt_ids)
            if max_tokens < 1:
                raise bad_request(
                    f"This model's maximum context length is {state.max_model_len} tokens. However, your messages "
                    f"resulted in {len(prompt_ids)} tokens. Please reduce the length of the messages.",
                    param="messages",
                    code="context_length_exceeded",
                )
        end_of_turn = [] if body.ignore_eos else sorted(end_of_turn_ids(state.chat_format, tokenizer))
        stop_ids = list(body.stop_token_ids or []) + end_of_turn
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = [
            GenerationRequest(
                prompt_ids=prompt_ids,
                sampling=sampling_params(body, logprobs=top, choice=i, vocab_size=tokenizer.vocab_size),
                max_tokens=max_tokens,
                stop=list(body.stop or []),  # type: ignore[arg-type]
                stop_token_ids=stop_ids,
                ignore_eos=bool(body.ignore_eos),
                min_tokens=body.min_tokens or 0,
            )
            for i in range(body.n or 1)
        ]
        handles = submit_all(engine, requests, prompt_param="messages")
        choices = [Choice(i, 0, h, prompt_ids) for i, h in enumerate(handles)]
        chat_id, created = request_id(request), now()
        describe_submitted(chat_id, handles, len(prompt_ids), max_tokens)
        request.state.outcome = outcome(choices)
        if body.stream:
            stream = stream_chat(choices, body, state, chat_id, created)
            return SSEResponse(stream, on_close=lambda: abort_all(choices, state.metrics))
        if not await collect(choices, request, state.metrics):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(chat_response(choices, body, state, chat_id, created))

    return app


def abort_all(choices: list[Choice], metrics: Metrics) -> None:
    for choice in choices:
        choice.abort(metrics)


def completion_prompts(body: CompletionRequest, loaded: LoadedModel, add_bos: bool) -> list[tuple[list[int], str]]:
    """(ids, text to echo) per prompt; strings are encoded with control tokens recognised, ids are checked."""
    tokenizer = loaded.tokenizer
    prompts = body.prompts()
    if not prompts:
        raise bad_request("prompt must not be empty", param="prompt")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request(f"prompt {i} is empty", param="prompt")
            out.append((tokenizer.encode(prompt, bos=add_bos, allow_special=True), prompt))
        else:
            if not prompt:
                raise bad_request(f"prompt {i} is an empty token list", param="prompt")
            check_ids(prompt, tokenizer.vocab_size, "prompt")
            out.append((list(prompt), spelled_out(tokenizer, prompt)))
    return out


def token_text(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    """The text of one token as clients name it: a control token's name, else its bytes as UTF-8 (None if not text)."""
    if token_id is None or not 0 <= token_id < tokenizer.vocab_size:
        return None
    for text, i in tokenizer.special_tokens.items():
        if i == token_id:
            return text
    try:
        return tokenizer.token_bytes(token_id).decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def tokenizer_info_of(loaded: LoadedModel, add_bos: bool, max_model_len: int) -> TokenizerInfoResponse:
    """GET /tokenizer_info. The Tokenizer protocol has no pad token: a `pad_id` attribute is used where a tokenizer has one."""
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
        add_bos_token=add_bos,
        model_max_length=max_model_len,
        vocab_size=tokenizer.vocab_size,
        chat_template=loaded.chat_template,
    )


def spelled_out(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Text of a token-id prompt for echo: control tokens by name (as a text prompt writes them), the rest decoded."""
    names = {i: text for text, i in tokenizer.special_tokens.items()}
    parts, run = [], []
    for token_id in ids:
        if token_id in names:
            parts += [tokenizer.decode(run), names[token_id]]
            run = []
        else:
            run.append(token_id)
    return "".join(parts) + tokenizer.decode(run)


def chat_prompt(body: ChatCompletionRequest, loaded: LoadedModel, state: ServerState) -> list[int]:
    try:
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        return render_chat(messages, loaded.tokenizer, state.chat_format, default_system=state.default_system)
    except (ChatFormatError, ValueError) as e:
        raise bad_request(str(e), param="messages") from e


def usage_of(choices: list[Choice]) -> Usage:
    """Prompt tokens once per prompt (shared by its n choices), completion tokens over all choices."""
    usage = Usage()
    seen: set[int] = set()
    for c in choices:
        prompt = c.num_prompt_tokens or len(c.prompt_ids)
        usage.add(0 if c.prompt_index in seen else prompt, c.num_generated_tokens)
        seen.add(c.prompt_index)
    return usage


def completion_response(
    choices: list[Choice], body: CompletionRequest, state: ServerState, rid: str, created: int
) -> dict[str, Any]:
    tokenizer = state.loaded.tokenizer  # type: ignore[union-attr]
    out = []
    for c in choices:
        logprobs = None
        if body.logprobs is not None:
            builder = LegacyLogprobs(tokenizer)
            echoed = builder.prompt(c.prompt_ids, c.prompt_logprobs, c.echo_text) if c.echo_text else None
            logprobs = merge_logprobs(*filter(None, [echoed, builder.take(c.logprobs)]))
        text = c.echo_text + "".join(c.text)
        out.append(CompletionChoice(text=text, index=c.index, logprobs=logprobs, finish_reason=c.finish_reason or "stop"))
    response = CompletionResponse(id=rid, created=created, model=state.model_name, choices=out, usage=usage_of(choices))
    return response.model_dump()


def chat_response(
    choices: list[Choice], body: ChatCompletionRequest, state: ServerState, rid: str, created: int
) -> dict[str, Any]:
    tokenizer = state.loaded.tokenizer  # type: ignore[union-attr]
    out = []
    for c in choices:
        logprobs = ChatLogprobs(content=chat_logprobs(tokenizer, c.logprobs, body.top_logprobs or 0)) if body.logprobs else None
        message = AssistantMessage(content="".join(c.text))
        out.append(ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=c.finish_reason or "stop"))
    response = ChatCompletionResponse(id=rid, created=created, model=state.model_name, choices=out, usage=usage_of(choices))
    return response.model_dump()


async def stream_completion(
    choices: list[Choice], body: CompletionRequest, state: ServerState, rid: str, created: int
) -> AsyncIterator[str]:
    """SSE chunks of a completion: echo first, then deltas, a usage chunk if asked, then [DONE]."""
    tokenizer = state.loaded.tokenizer  # type: ignore[union-attr]
    include_usage = body.include_usage()
    builders = {c.index: LegacyLogprobs(tokenizer) for c in choices} if body.logprobs is not None else {}

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None) -> str:
        data: dict[str, Any] = {
            "id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "choices": [{"text": text, "index": index, "logprobs": logprobs and logprobs.model_dump(), "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    echo_pending = {c.index for c in choices if c.echo_text}
    try:
        async for item in merged_outputs(choices, state.settings.keepalive_s):
            if item is None:
                yield ": keepalive\n\n"
                continue
            c, out = item
            c.add(out, state.metrics)
            text, logprobs = out.text, None
            builder = builders.get(c.index)
            echoed = None
            if c.index in echo_pending:  # the prompt goes out with the first output (it carries prompt logprobs)
                echo_pending.discard(c.index)
                text = c.echo_text + text
                if builder is not None:
                    echoed = builder.prompt(c.prompt_ids, out.prompt_logprobs, c.echo_text)
            if builder is not None:
                logprobs = merge_logprobs(*filter(None, [echoed, builder.take(out.logprobs or [])]))
            if text or out.finish_reason or (logprobs is not None and logprobs.tokens):
                yield chunk(c.index, text, logprobs, out.finish_reason)
        if include_usage:
            usage = usage_of(choices).model_dump()
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                       "choices": [], "usage": usage})
    except Exception as e:  # noqa: BLE001 - after the 200 an error can only be an event
        yield error_event(e, rid)
    yield sse("[DONE]")


async def stream_chat(
    choices: list[Choice], body: ChatCompletionRequest, state: ServerState, rid: str, created: int
) -> AsyncIterator[str]:
    """SSE chunks of a chat completion: role delta first, content deltas, then `{}` with finish_reason."""
    tokenizer = state.loaded.tokenizer  # type: ignore[union-attr]
    include_usage = body.include_usage()

    def chunk(index: int, delta: dict[str, str], logprobs: ChatLogprobs | None = None, finish: str | None = None) -> str:
        data = ChatCompletionChunk(
            id=rid, created=created, model=state.model_name,
            choices=[ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)],
        ).model_dump(exclude=None if include_usage else {"usage"})
        return sse(data)

    try:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for item in merged_outputs(choices, state.settings.keepalive_s):
            if item is None:
                yield ": keepalive\n\n"
                continue
            c, out = item
            c.add(out, state.metrics)
            logprobs = None
            if body.logprobs and out.logprobs:
                logprobs = ChatLogprobs(content=chat_logprobs(tokenizer, out.logprobs, body.top_logprobs or 0))
            if out.text or logprobs is not None:
                yield chunk(c.index, {"content": out.text}, logprobs)
            if out.finish_reason is not None:
                yield chunk(c.index, {}, None, out.finish_reason)
        if include_usage:
            last = ChatCompletionChunk(id=rid, created=created, model=state.model_name, choices=[], usage=usage_of(choices))
            yield sse(last.model_dump())
    except Exception as e:  # noqa: BLE001 - after the 200 an error can only be an event
        yield error_event(e, rid)
    yield sse("[DONE]")
