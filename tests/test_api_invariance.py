"""Batch invariance over HTTP, as an evaluation user probes it: the same requests (completions with
echo + logprobs, chat with top_logprobs, streamed and not, greedy and seeded) sent alone and among
other concurrent requests give identical JSON, on the server's default numeric path.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.checkpoint import LoadedModel, load_model
from tests.support.api import parse_sse, serve_app, settings

pytestmark = pytest.mark.anyio
MODEL = "SmolLM2-135M-Instruct"
PROBES: list[tuple[str, dict[str, Any]]] = [
    (
        "/v1/completions",
        {"prompt": "The three primary colours are", "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 5},
    ),
    (
        "/v1/completions",
        {"prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0.8, "seed": 11, "logprobs": 2, "stream": True},
    ),
    (
        "/v1/completions",
        {"prompt": "Paris is the capital of", "max_tokens": 0, "echo": True, "logprobs": 1},
    ),  # lm-eval loglikelihood
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Name a fruit."}],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 6,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 3,
            "logprobs": True,
            "top_logprobs": 2,
            "stream": True,
        },
    ),
]


@pytest.fixture(scope="module")
def default_path_model(smollm2_path: Path) -> LoadedModel:
    return load_model(smollm2_path, max_batch_size=16, max_seq_len=512, quantization="auto")  # the server's defaults


def comparable(path: str, body: dict[str, Any], response: httpx.Response) -> Any:
    """What a client sees, minus ids, timestamps and how much of the prompt the prefix cache supplied (which
    depends on what ran before; the outputs must not)."""
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        data = response.json()
        return {"choices": data["choices"], "usage": uncached(data["usage"])}
    events, done, _ = parse_sse(response.text)
    assert done
    return [{k: uncached(v) if k == "usage" else v for k, v in e.items() if k not in ("id", "created")} for e in events]


def uncached(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if usage is None else {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def crowd_requests() -> list[tuple[str, dict[str, Any]]]:
    words = " ".join(f"word{i}" for i in range(150))  # a long prompt: prefill beside the decodes, a second key block
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(12):
        if i % 3 == 0:
            out.append(("/v1/completions", {"prompt": f"{words} {i}", "max_tokens": 20, "temperature": 0}))
        elif i % 3 == 1:
            out.append(
                ("/v1/completions", {"prompt": f"Story {i}:", "max_tokens": 30, "temperature": 1.0, "top_k": 500, "stream": True})
            )
        else:
            out.append(
                (
                    "/v1/chat/completions",
                    {
                        "messages": [{"role": "user", "content": f"Count to {i}."}],
                        "max_tokens": 25,
                        "temperature": 0.5,
                        "top_p": 0.5,
                    },
                )
            )
    return out


async def test_probes_alone_and_in_a_crowd_are_identical(default_path_model: LoadedModel) -> None:
    cfg = settings(max_batch_size=16, max_seq_len=512)
    async with serve_app(cfg, default_path_model) as client:
        assert (await client.get("/v1/models")).json()["data"][0]["batch_invariant"] is True

        async def send(path: str, body: dict[str, Any]) -> httpx.Response:
            return await client.post(path, json={"model": MODEL, **body})

        alone = [comparable(p, b, await send(p, b)) for p, b in PROBES]
        crowd = [asyncio.create_task(send(p, b)) for p, b in crowd_requests()]
        await asyncio.sleep(0.1)  # the crowd holds slots and is mid-prefill when the probes arrive
        together = await asyncio.gather(*(send(p, b) for p, b in PROBES))
        for response in await asyncio.gather(*crowd):
            assert response.status_code == 200, response.text
    for (path, body), a, response in zip(PROBES, alone, together):
        b = comparable(path, body, response)
        assert a == b, f"{path} {json.dumps(body)} changed among other requests"
