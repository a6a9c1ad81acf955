"""The playground's server side (issue 15): the page and its assets with their security headers, the
engine snapshot its live panel polls, the API key, and the engine's last-minute telemetry.
The page itself runs in a real browser in tests/test_playground_browser.py."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from app.engine.telemetry import TTFT_BOUNDS_S, EngineTelemetry
from app.routes.playground import ASSETS, CONTENT_SECURITY_POLICY
from tests.support.api import MAX_SEQ_LEN, MODEL, serve_app, settings, slowed, tiny_loaded

STATIC = Path(__file__).resolve().parents[1] / "app" / "static"
anyio = pytest.mark.anyio


@anyio
async def test_the_page_and_its_assets_are_served_open_with_a_strict_policy() -> None:
    async with serve_app(settings(api_key="sk-play")) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        for src in re.findall(r'(?:src|href)="(/[^"]+)"', page.text):  # everything the page loads is ours and open
            asset = await client.get(src)
            assert asset.status_code == 200, src
            assert asset.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert sorted(re.findall(r'(?:src|href)="/playground/([^"]+)"', page.text)) == sorted(ASSETS)
        missing = await client.get("/playground/secrets.txt", headers={"Authorization": "Bearer sk-play"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        # What the page reads and generates needs the key, like any client.
        assert (await client.get("/engine/snapshot")).status_code == 401
        assert (await client.get("/engine/snapshot", headers={"Authorization": "Bearer sk-play"})).status_code == 200


@anyio
async def test_no_playground_leaves_out_the_page_but_keeps_the_snapshot() -> None:
    async with serve_app(settings(playground=False)) as client:
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/playground/playground.js")).status_code == 404
        assert (await client.get("/engine/snapshot")).status_code == 200


def test_the_page_has_no_inline_script_and_inserts_model_text_only_as_text() -> None:
    """The policy forbids inline script; the script must not build HTML from strings it received."""
    html = (STATIC / "playground.html").read_text()
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None  # every script is a file
    assert re.search(r"\son[a-z]+=", html) is None  # no inline event handlers
    assert re.search(r"\sstyle=", html) is None  # no inline styles (style-src 'self')
    script = (STATIC / "playground.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "localStorage.setItem(KEY_STORAGE" not in script and "sessionStorage.setItem(KEY_STORAGE" in script


def test_every_form_control_has_a_label() -> None:
    html = (STATIC / "playground.html").read_text()
    labelled = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', html))
    controls = re.findall(r'<(?:input|textarea|select)\b[^>]*\bid="([^"]+)"', html)
    wrapped = set(re.findall(r'<label[^>]*>\s*<input[^>]*\bid="([^"]+)"', html))
    assert controls and all(c in labelled | wrapped for c in controls), set(controls) - labelled - wrapped


@anyio
async def test_the_snapshot_shows_a_slot_busy_while_a_request_runs_then_free_and_counted() -> None:
    async with serve_app(settings(), slowed(tiny_loaded(), delay=0.02)) as client:
        idle = (await client.get("/engine/snapshot")).json()
        assert idle["model"] == MODEL and idle["max_seq_len"] == MAX_SEQ_LEN and idle["running"] == 0
        assert [s["state"] for s in idle["slots"]] == ["free"] * idle["max_batch_size"]
        body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 40, "ignore_eos": True}
        task = asyncio.ensure_future(client.post("/v1/completions", json=body))
        busy = None
        for _ in range(200):
            snapshot = (await client.get("/engine/snapshot")).json()
            if any(s["state"] == "decoding" for s in snapshot["slots"]):
                busy = snapshot
                break
            await asyncio.sleep(0.01)
        assert busy is not None, "no slot was seen decoding"
        [slot] = [s for s in busy["slots"] if s["state"] == "decoding"]
        assert slot["request"]["id"].startswith("cmpl-") and slot["request"]["max_tokens"] == 40
        assert slot["request"]["prompt_tokens"] <= slot["request"]["tokens_in_cache"] <= MAX_SEQ_LEN
        assert (await task).status_code == 200
        for _ in range(100):  # the step that sent the last token is recorded just after it was sent
            done = (await client.get("/engine/snapshot")).json()
            if sum(s["generated_tok_s"] for s in done["last_minute"]["per_second"]) == 40:
                break
            await asyncio.sleep(0.01)
        assert [s["state"] for s in done["slots"]] == ["free"] * done["max_batch_size"]
        minute = done["last_minute"]
        assert sum(s["generated_tok_s"] for s in minute["per_second"]) == 40 == done["totals"]["generated_tokens"]
        assert minute["ttft"]["count"] == 1 and sum(minute["ttft"]["counts"]) == 1 and minute["step_ms_mean"] > 0


def test_telemetry_buckets_the_last_minute_and_forgets_what_is_older() -> None:
    telemetry = EngineTelemetry(window_s=60)
    now = 1000.5  # the window is seconds 941..1000, the current one last
    telemetry.record_step(now - 90, 0.5, 7, 0)  # older than the window
    telemetry.record_step(now - 30.8, 0.010, 4, 100)  # second 969
    telemetry.record_step(now - 30.55, 0.030, 4, 0)  # second 969
    telemetry.record_step(now - 0.1, 0.020, 2, 0)  # second 1000
    for ttft in (0.02, 0.3, 0.3, 20.0):
        telemetry.record_first_token(now - 1, ttft)
    telemetry.record_first_token(now - 61, 0.01)  # older than the window
    summary = telemetry.summary(now)
    series = summary["per_second"]
    assert len(series) == 60 and summary["steps"] == 3
    assert series[28] == {"generated_tok_s": 8, "prefill_tok_s": 100, "steps": 2, "step_ms": 20.0}
    assert series[-1]["generated_tok_s"] == 2 and sum(s["steps"] for s in series) == 3
    assert summary["generated_tok_s"] == pytest.approx(10 / 60, abs=0.01) and summary["step_ms_mean"] == 20.0
    assert telemetry.summary(now + 45)["per_second"][-46]["generated_tok_s"] == 2  # the window moves on
    assert telemetry.summary(now + 60)["steps"] == 0
    ttft = summary["ttft"]
    assert ttft["count"] == 4 and ttft["p50_s"] == 0.3 and ttft["bounds_s"] == list(TTFT_BOUNDS_S)
    assert ttft["counts"] == [1, 0, 0, 2, 0, 0, 0, 0, 1]  # <= 0.05, <= 0.5 twice, slower than 10 s
