"""Health through the server's life, metrics, models, (de)tokenize, drain, and client disconnects on a real
uvicorn server (the slot must come back whether the client drops a stream or a plain request)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

import app.lifecycle as server_module
from app.server import create_app
from tests.support.api import MAX_SEQ_LEN, MODEL, OK, assert_error, serve_app, settings, slowed, tiny_loaded, uvicorn_thread


@pytest.mark.anyio
async def test_health_loading_then_ready_and_requests_wait_with_503(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def load(_settings: Any) -> Any:
        release.wait(10)
        return tiny_loaded()

    monkeypatch.setattr(server_module, "load_checkpoint", load)
    app = create_app(settings(warmup=True))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            r = await client.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "loading"}
            live = await client.get("/health/live")  # loading is alive: a liveness probe must not restart it
            assert live.status_code == 200 and live.json() == {"status": "loading"}
            r = await client.post("/v1/completions", json=OK)
            assert_error(r, 503, code="model_loading")
            assert r.headers["retry-after"].isdigit()
            release.set()
            await asyncio.wait_for(app.state.server.ready.wait(), 10)
            r = await client.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            assert (await client.head("/health")).status_code == 200
            assert (await client.post("/v1/completions", json=OK)).status_code == 200


@pytest.mark.anyio
async def test_load_failure_reports_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(_settings: Any) -> Any:
        raise FileNotFoundError("no checkpoint at /nowhere")

    monkeypatch.setattr(server_module, "load_checkpoint", load)
    app = create_app(settings())
    failed = asyncio.Event()
    app.state.server.on_failure = failed.set
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(failed.wait(), 10)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "failed" and "/nowhere" in r.json()["error"]
            assert (await client.get("/health/live")).status_code == 503
            assert_error(await client.post("/v1/completions", json=OK), 503)


@pytest.mark.anyio
async def test_drain_finishes_running_requests_and_refuses_new_ones() -> None:
    loaded = slowed(tiny_loaded(), 0.01)
    async with serve_app(settings(drain_timeout=10), loaded) as client:
        state = client.app.state.server  # type: ignore[attr-defined]
        running = asyncio.ensure_future(client.post("/v1/completions", json={**OK, "max_tokens": 20, "ignore_eos": True}))
        while state.engine.stats().running == 0:
            await asyncio.sleep(0.005)
        draining = asyncio.ensure_future(state.drain())
        await asyncio.sleep(0.02)
        r = await client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        live = await client.get("/health/live")  # draining is alive: not restarted mid-drain
        assert live.status_code == 200 and live.json() == {"status": "draining"}
        assert_error(await client.post("/v1/completions", json=OK), 503, code="server_draining")
        done = await running
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 20, done.text
        await draining


@pytest.mark.anyio
async def test_drain_timeout_ends_long_requests_cleanly() -> None:
    loaded = slowed(tiny_loaded(), 0.01)
    async with serve_app(settings(drain_timeout=0.1), loaded) as client:
        state = client.app.state.server  # type: ignore[attr-defined]
        running = asyncio.ensure_future(client.post("/v1/completions", json={**OK, "max_tokens": 100, "ignore_eos": True}))
        while state.engine.stats().running == 0:
            await asyncio.sleep(0.005)
        await state.drain()
        r = await running
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] < 100


@pytest.mark.anyio
async def test_models_tokenize_detokenize() -> None:
    async with serve_app() as client:
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        [card] = models["data"]
        assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == MAX_SEQ_LEN
        assert isinstance(card["created"], int) and isinstance(card["owned_by"], str)
        assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
        assert_error(await client.get("/v1/models/other"), 404, code="model_not_found")
        text = "héllo <|im_end|>"
        r = (await client.post("/tokenize", json={"model": MODEL, "prompt": text})).json()
        expected = list("héllo ".encode()) + [257]  # completion prompts recognise control-token text
        assert r == {"tokens": expected, "count": len(expected), "max_model_len": MAX_SEQ_LEN}
        assert (await client.post("/detokenize", json={"tokens": list("héllo".encode())})).json() == {"prompt": "héllo"}
        assert_error(await client.post("/detokenize", json={"tokens": [1, 100000]}), 400, param="tokens")
        assert_error(await client.post("/tokenize", json={"model": "x", "prompt": "a"}), 404)
        assert_error(await client.post("/tokenize", json={"prompt": 3}), 400)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


@pytest.mark.anyio
async def test_metrics_count_tokens_reasons_and_latencies() -> None:
    async with serve_app() as client:
        a = (await client.post("/v1/completions", json={**OK, "max_tokens": 5, "ignore_eos": True})).json()
        b = (await client.post("/v1/completions", json={**OK, "logit_bias": {"257": 100}})).json()
        c = await client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 3,
                "ignore_eos": True,
                "stream": True,
            },
        )
        r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert c.status_code == 200
    assert metric(text, "llamaserve_requests_running") == 0 and metric(text, "llamaserve_requests_waiting") == 0
    assert metric(text, "llamaserve_slot_usage_ratio") == 0
    prompt = a["usage"]["prompt_tokens"] + b["usage"]["prompt_tokens"]
    assert metric(text, "llamaserve_prompt_tokens_total") > prompt  # plus the chat prompt
    assert metric(text, "llamaserve_generation_tokens_total") == 5 + 1 + 3
    assert 'llamaserve_requests_finished_total{finish_reason="length"} 2.0' in text
    assert 'llamaserve_requests_finished_total{finish_reason="stop"} 1.0' in text
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert metric(text, f"llamaserve_{name}_count") == 3
    assert metric(text, "llamaserve_inter_token_latency_seconds_count") >= 4 + 2


@pytest.mark.anyio
async def test_each_app_has_its_own_registry() -> None:
    async with serve_app() as one, serve_app() as two:
        await one.post("/v1/completions", json=OK)
        assert metric((await one.get("/metrics")).text, "llamaserve_generation_tokens_total") >= 1
        assert metric((await two.get("/metrics")).text, "llamaserve_generation_tokens_total") == 0


def wait_until(predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - start


def test_disconnect_mid_stream_frees_the_slot() -> None:
    loaded = slowed(tiny_loaded(), 0.02)  # 100 tokens would take >= 2 s
    with uvicorn_thread(settings(), loaded) as (url, state):
        body = {**OK, "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                assert state.engine.stats().running == 1
        # leaving the blocks closed the connection after one chunk
        assert wait_until(lambda: state.engine.stats().running == 0, 1.5) < 1.5
        assert state.engine.stats().generated_tokens_total < 100
        with httpx.Client(base_url=url, timeout=10) as client:
            text = client.get("/metrics").text
            assert "llamaserve_requests_running 0.0" in text
            assert 'llamaserve_requests_finished_total{finish_reason="abort"} 1.0' in text
            assert client.post("/v1/completions", json=OK).status_code == 200


def test_disconnect_while_waiting_for_a_plain_response_frees_the_slot() -> None:
    loaded = slowed(tiny_loaded(), 0.02)
    with uvicorn_thread(settings(), loaded) as (url, state):
        body = {**OK, "max_tokens": 100, "ignore_eos": True}
        with httpx.Client(base_url=url, timeout=0.4) as client:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body)
        assert wait_until(lambda: state.engine.stats().running == 0, 1.5) < 1.5
        assert state.engine.stats().generated_tokens_total < 100
        with httpx.Client(base_url=url, timeout=10) as client:
            assert 'llamaserve_requests_finished_total{finish_reason="abort"} 1.0' in client.get("/metrics").text
            assert client.post("/v1/completions", json=OK).status_code == 200


@pytest.mark.anyio
async def test_health_unhealthy_when_the_engine_stops_stepping(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = tiny_loaded()
    forward = loaded.model.forward
    stuck = threading.Event()

    def hang(*args: Any, **kwargs: Any) -> Any:
        stuck.wait(10)
        return forward(*args, **kwargs)

    async with serve_app(loaded=loaded) as client:
        state = client.app.state.server  # type: ignore[attr-defined]
        loaded.model.forward = hang  # type: ignore[method-assign]
        request = asyncio.ensure_future(client.post("/v1/completions", json=OK))
        while state.engine.stats().running + state.engine.stats().waiting == 0:
            await asyncio.sleep(0.005)
        assert (await client.get("/health")).status_code == 200  # busy, but not for long yet
        monkeypatch.setattr(server_module, "STALL_S", 0.05)
        await asyncio.sleep(0.1)
        r = await client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "unhealthy"}
        live = await client.get("/health/live")  # a stalled engine is what a liveness probe restarts
        assert live.status_code == 503 and live.json() == {"status": "unhealthy"}
        stuck.set()
        assert (await request).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health/live")).status_code == 200


def test_the_compiler_is_imported_ahead_while_loading() -> None:
    """With --compile, torch.compile's modules load in their own thread beside the checkpoint (start-up):
    in a fresh process, since this one has them already. An ImportError there (a torch that moved them)
    would only show as a thread's traceback and a slower start."""
    import subprocess
    import sys

    code = (
        "import sys, threading, torch\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules\n"
        "import app.lifecycle as lifecycle\n"
        "errors = []\n"
        "threading.excepthook = lambda args: errors.append(args.exc_value)\n"
        "lifecycle.import_compiler_ahead()\n"
        "[t.join() for t in threading.enumerate() if t.name == 'llamaserve-import']\n"
        "assert not errors, errors\n"
        "assert 'torch._inductor.compile_fx' in sys.modules and 'torch._dynamo' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
