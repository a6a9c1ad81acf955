"""One real streamed completion against a running llamaserve: proves the container serves SSE end to end,
and that the playground's page and assets shipped in the package (GET / with its Content Security Policy).

Standard library only, so it runs with any python3 on the CI host. Exit status 0 only when the body
is a sequence of `data: <json>` events with non-empty text, one finish_reason, ending in `data: [DONE]`.
Usage: python3 .ci/stream_check.py http://127.0.0.1:18000
"""

from __future__ import annotations

import json
import sys
import urllib.request


def served_model(base: str) -> str:
    """The first id from /v1/models, so the check does not hard-code the model name."""
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def stream_completion(base: str, model: str) -> tuple[str, str]:
    """POST a streamed greedy completion; return (content type, raw body)."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        f"{base}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as resp:
        return resp.headers.get("Content-Type", ""), resp.read().decode("utf-8")


def check_sse(content_type: str, raw: str) -> str:
    """Validate the SSE framing and chunk shapes; return the streamed text. Raises AssertionError."""
    assert content_type.startswith("text/event-stream"), f"content type {content_type!r}"
    events = [event for event in raw.split("\n\n") if event.strip()]
    assert events, "empty body"
    assert all(event.startswith("data: ") for event in events), f"non-data event in {raw[:500]!r}"
    assert events[-1] == "data: [DONE]", f"last event is {events[-1]!r}, not [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert chunks, "no data chunks before [DONE]"
    assert all("error" not in chunk for chunk in chunks), f"error chunk in {raw[:500]!r}"
    assert all(chunk["object"] == "text_completion" for chunk in chunks), "wrong object type"
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    finishes = [choice["finish_reason"] for choice in choices if choice["finish_reason"] is not None]
    assert finishes in (["stop"], ["length"]), f"finish reasons {finishes}"
    text = "".join(choice["text"] for choice in choices)
    assert text.strip(), "streamed text is empty"
    return text


def check_playground(base: str) -> None:
    """The page and each asset it names answer 200 with a Content Security Policy. Raises AssertionError."""
    with urllib.request.urlopen(f"{base}/", timeout=30) as resp:
        page = resp.read().decode("utf-8")
        assert "script-src 'self'" in (resp.headers.get("Content-Security-Policy") or ""), "no CSP on the page"
    assets = [part.split('"', 1)[0] for part in page.split('="/playground/')[1:]]
    assert assets, "the page names no assets"
    for asset in assets:
        with urllib.request.urlopen(f"{base}/playground/{asset}", timeout=30) as resp:
            assert resp.status == 200 and resp.read(), f"empty asset {asset}"


def main() -> int:
    base = sys.argv[1].rstrip("/") if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    model = served_model(base)
    content_type, raw = stream_completion(base, model)
    try:
        text = check_sse(content_type, raw)
    except AssertionError as error:
        print(f"FAIL: {error}\n--- body ---\n{raw[:2000]}", file=sys.stderr)
        return 1
    print(f"OK: model {model!r} streamed {raw.count('data: ') - 1} chunks: {text!r}")
    try:
        check_playground(base)
    except AssertionError as error:
        print(f"FAIL: the playground: {error}", file=sys.stderr)
        return 1
    print("OK: the playground's page and assets are served")
    return 0


if __name__ == "__main__":
    sys.exit(main())
