"""HTTP API test helpers: the tiny-model app behind httpx or a real uvicorn, SSE parsing, the error envelope."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import uvicorn

from app.config import Settings
from app.connections import uvicorn_config
from app.server import create_app
from model.checkpoint import LoadedModel
from model.tokenizer import ByteTokenizer
from tests.support.models import tiny_args, tiny_model

CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # ids 256, 257, 258
IM_START, IM_END, ENDOFTEXT = 256, 257, 258
MODEL = "tiny"
MAX_SEQ_LEN = 128
OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}  # a completion any test server serves


def tiny_loaded(seed: int = 0, max_batch_size: int = 4, specials: tuple[str, ...] = CHATML_SPECIALS) -> LoadedModel:
    tokenizer = ByteTokenizer(specials)
    model = tiny_model(max_batch_size=max_batch_size, max_seq_len=MAX_SEQ_LEN, seed=seed)
    return LoadedModel(model, tokenizer, tiny_args(), MODEL, None)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"warmup": False, "compile": False}  # compile: its own tests (test_static_step.py)
    values.update(overrides)
    return Settings(**values)


def slowed(loaded: Any, delay: float = 0.01) -> Any:
    """`loaded` with every forward of its model taking `delay` seconds longer."""
    forward = loaded.model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return forward(*args, **kwargs)

    loaded.model.forward = slow
    return loaded


@asynccontextmanager
async def serve_app(cfg: Settings | None = None, loaded: LoadedModel | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running and the model ready, behind an in-process httpx client."""
    app = create_app(cfg or settings(), loaded or tiny_loaded())
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.server.ready.wait(), 30)
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def still_serves(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> None:
    r = await client.post("/v1/completions", json=OK, headers=headers)
    assert r.status_code == 200, r.text


def chatml_count(text: str) -> int:
    """Prompt length of hand-written ChatML text, encoded by a tokenizer that parses control tokens."""
    return len(ByteTokenizer(CHATML_SPECIALS).encode(text, allow_special=True))


def parse_sse(raw: str) -> tuple[list[dict[str, Any]], bool, int]:
    """(events, saw [DONE] last, keep-alive comments), checking the exact framing of every event."""
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events, done, keepalives = [], False, 0
    for block in raw[:-2].split("\n\n"):
        assert not done, "nothing may follow data: [DONE]"
        if block == ": keepalive":
            keepalives += 1
            continue
        assert block.startswith("data: ") and "\n" not in block, f"bad SSE event {block!r}"
        payload = block[len("data: ") :]
        if payload == "[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    return events, done, keepalives


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI envelope with exactly its four keys."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def token_id(text: str, tokenizer: ByteTokenizer) -> int:
    """Back from a logprobs token string to its id (ByteTokenizer: one byte per id, or a control token)."""
    if text in tokenizer.special_tokens:
        return tokenizer.special_tokens[text]
    if text.startswith("bytes:\\x"):
        return int(text[len("bytes:\\x") :], 16)
    raw = text.encode()
    assert len(raw) == 1, text
    return raw[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float) -> None:
    """Until GET /health of a server subprocess answers 200; fails with its log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"server exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"server not ready in {timeout:.0f} s: {log.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


@contextmanager
def uvicorn_thread(cfg: Settings, loaded: LoadedModel) -> Iterator[tuple[str, Any]]:
    """A real uvicorn server on a loopback port in a thread; yields (base_url, server state)."""
    app = create_app(cfg, loaded)
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, cfg, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    state = app.state.server
    deadline = time.monotonic() + 30
    while not (server.started and state.phase == "ready"):
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=30)
