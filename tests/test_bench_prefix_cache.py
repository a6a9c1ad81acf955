"""bench/prefix_cache.py measures what it says: one TTFT per conversation and turn, the shared-prompt wave,
and the issue-13 ratios, here against a real server on the tiny model."""

from __future__ import annotations

import asyncio

from bench.prefix_cache import build_parser, multi_turn, percentile, report, shared_system
from model.checkpoint import LoadedModel
from model.tokenizer import ByteTokenizer
from tests.support.api import CHATML_SPECIALS, MODEL, settings, uvicorn_thread
from tests.support.models import tiny_args, tiny_model


def test_the_workloads_time_every_turn_and_request_against_a_real_server() -> None:
    args = build_parser().parse_args(
        ["--conversations", "3", "--turns", "2", "--max-tokens", "4", "--shared-requests", "3", "--system-repeat", "1"]
    )
    loaded = LoadedModel(tiny_model(4, 1024), ByteTokenizer(CHATML_SPECIALS), tiny_args(), MODEL, None)
    with uvicorn_thread(settings(), loaded) as (url, state):
        turns = asyncio.run(multi_turn(url, MODEL, args))
        shared = asyncio.run(shared_system(url, MODEL, args))
        hits = state.engine.prefix_cache.stats.hits
    assert [len(t) for t in turns] == [3, 3] and all(v > 0 for t in turns for v in t)
    assert len(shared) == 3 and all(v > 0 for v in shared)
    assert hits > 0  # the shared instructions and the histories came from the cache


def test_the_report_gives_the_ratios_issue_13_targets() -> None:
    on = {"turn_ttft_p50": [1.0, 0.2], "turn_ttft_p90": [1.1, 0.3], "shared_ttft_p50": 0.1, "shared_ttft_p90": 0.2}
    off = {"turn_ttft_p50": [1.0, 1.0], "turn_ttft_p90": [1.1, 1.2], "shared_ttft_p50": 0.5, "shared_ttft_p90": 0.6}
    llama = {"turn_ttft_p50": [0.5, 0.4], "turn_ttft_p90": [0.6, 0.5], "shared_ttft_p50": 0.3, "shared_ttft_p90": 0.4}
    text = report({"ours": on, "ours-no-cache": off, "llama-server": llama, "vllm": None})
    assert "turn 2: on/off 0.2  on/llama-server 0.5" in text and "shared system prompt: on/off 0.2" in text
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([], 0.5) is None
