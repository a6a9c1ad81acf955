"""Load generator for any OpenAI-compatible server: streaming /v1/completions over httpx.

A closed loop: `concurrency` clients each send a request, read its SSE stream to the end, then send
the next, until `num_requests` are done. Prompts are random plain English words (one token each in
most BPE vocabularies) so that every server tokenizes them to about the same length, and a new
random prompt per request keeps servers from reusing a cached prefix.

To make every server produce the asked-for output length, requests carry `min_tokens` (vLLM,
llama-cpp-python, ours) and `ignore_eos` (vLLM, ours); servers ignore fields they do not know.
Completed requests that still came back short are counted as `short_outputs`.

Output tokens are taken from the server's `usage` (sent with `stream_options.include_usage`) when it
reports one, otherwise the number of SSE chunks that carried text (one token each on llama.cpp).

    python -m bench.loadgen --base-url http://127.0.0.1:8000 -c 8 -n 32 --prompt-tokens 128 \
        --output-tokens 64-128 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import httpx

# Common short English words; each is a single token (with its leading space) in GPT-2-style,
# SentencePiece and tiktoken vocabularies, so a prompt of N words is close to N tokens everywhere.
WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which "
    "one you were all we her she there would their will when who him been has more if no out do so can "
    "what up said about other into than its time only could new them man some these then two first may "
    "any like now my such make over our even most me state after also made many did must before back "
    "see through way where get much go well your know should down work year because come people just "
    "say each those take day good how long own too little use us very great still men here life both "
    "between old under last never place same another think house while high right might came off find "
    "part again world school hand small"
).split()


@dataclass(frozen=True)
class Workload:
    """What to send: lengths are inclusive (low, high) ranges; low == high means fixed."""

    num_requests: int
    concurrency: int
    prompt_tokens: tuple[int, int] = (128, 128)
    output_tokens: tuple[int, int] = (128, 128)
    seed: int = 0
    ignore_eos: bool = True
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.concurrency < 1:
            raise ValueError("num_requests and concurrency must be >= 1")
        for name in ("prompt_tokens", "output_tokens"):
            low, high = getattr(self, name)
            if low < 1 or high < low:
                raise ValueError(f"{name} must be a range 1 <= low <= high, got {low}-{high}")


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    prompt_words: int
    max_tokens: int


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds relative to the request's start."""

    max_tokens: int
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # time.perf_counter() when the request was sent
    e2e: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    output_tokens: int = 0
    token_source: str = "chunks"  # "usage" when the server reported completion_tokens
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        """Gaps between successive text chunks (inter-token latency when a chunk is one token)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def parse_range(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64-256' -> (64, 256)."""
    parts = text.split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}")


def make_prompt(num_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def make_specs(workload: Workload) -> list[RequestSpec]:
    """The same seed gives the same prompts and lengths, so peers see identical workloads."""
    rng = random.Random(workload.seed)
    specs = []
    for _ in range(workload.num_requests):
        words = rng.randint(*workload.prompt_tokens)
        max_tokens = rng.randint(*workload.output_tokens)
        specs.append(RequestSpec(make_prompt(words, rng), words, max_tokens))
    return specs


def request_body(spec: RequestSpec, model: str, workload: Workload) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": workload.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "repeat_penalty": 1.0,  # llama-cpp-python defaults to 1.1; the others have no penalty
    }
    if workload.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = spec.max_tokens
    return body


def apply_event(result: RequestResult, data: str, now: float) -> bool:
    """Fold one SSE `data:` payload into result; returns False once the stream is over."""
    if data.strip() == "[DONE]":
        result.done = True
        return False
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"SSE event is not a JSON object: {data[:100]}")
    if "error" in event:
        error = event["error"]
        result.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        return False
    for choice in event.get("choices") or []:
        if choice.get("text"):
            result.chunk_times.append(now)
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        result.token_source = "usage"
        result.prompt_tokens = usage.get("prompt_tokens")
    return True


async def send_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """Stream one completion; every failure becomes result.error, never an exception."""
    result = RequestResult(max_tokens=body["max_tokens"])
    result.start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators and ': keepalive' comments
                    if not apply_event(result, line[5:].lstrip(), time.perf_counter() - result.start):
                        break
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e = time.perf_counter() - result.start
    if result.token_source == "chunks":
        result.output_tokens = len(result.chunk_times)
    if result.error is None and not result.chunk_times:
        result.error = "stream ended without any text"
    if result.error is None and not (result.done or result.finish_reason):
        result.error = "stream cut off: no finish_reason and no [DONE]"
    result.ok = result.error is None
    return result


async def run_workload(
    base_url: str, model: str, workload: Workload, *, timeout: float = 600.0, warmup: int = 0
) -> tuple[list[RequestResult], float]:
    """Run the closed loop; returns per-request results (in spec order) and the wall time in seconds."""
    url = base_url.rstrip("/") + "/v1/completions"
    specs = make_specs(workload)
    limits = httpx.Limits(max_connections=workload.concurrency + 1, max_keepalive_connections=workload.concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client:
        warm_rng = random.Random(workload.seed + 1)
        for _ in range(warmup):
            warm = RequestSpec(make_prompt(workload.prompt_tokens[0], warm_rng), workload.prompt_tokens[0], 8)
            await send_one(client, url, request_body(warm, model, workload))

        results: list[RequestResult | None] = [None] * len(specs)
        next_index = iter(range(len(specs)))

        async def client_loop() -> None:
            for i in next_index:  # a shared iterator: each index is taken by exactly one client
                results[i] = await send_one(client, url, request_body(specs[i], model, workload))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(workload.concurrency)))
        duration = time.perf_counter() - started
    return [r for r in results if r is not None], duration


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default method); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """mean/p50/p90/p99 of values times scale (e.g. 1000 for ms); n = how many samples; None if none."""
    scaled = [v * scale for v in values]
    mean = sum(scaled) / len(scaled) if scaled else None
    return {"n": len(scaled), "mean": mean, **{f"p{q}": percentile(scaled, q) for q in (50, 90, 99)}}


def summarize(label: str, workload: Workload, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The report: aggregate throughput plus latency distributions over the completed requests."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [t for t in (r.tpot for r in done) if t is not None and t > 0]
    return {
        "label": label,
        "workload": asdict(workload),
        "requests": len(results),
        "completed": len(done),
        "errors": len(failed),
        "error_samples": sorted({r.error or "" for r in failed})[:5],
        "short_outputs": sum(1 for r in done if r.output_tokens < r.max_tokens),
        "token_source": sorted({r.token_source for r in done}),
        "duration_s": duration,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in done) or None,
        "output_tok_s": output_tokens / duration if duration > 0 else 0.0,
        "requests_s": len(done) / duration if duration > 0 else 0.0,
        "ttft_ms": distribution([r.ttft for r in done if r.ttft is not None], 1000.0),
        "itl_ms": distribution([gap for r in done for gap in r.itls], 1000.0),
        "tpot_ms": distribution(tpots, 1000.0),
        "e2e_s": distribution([r.e2e for r in done]),
        "decode_tok_s": distribution([1.0 / t for t in tpots]),  # per request, after the first token
    }


def format_number(value: float | None, width: int = 10) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of one report."""
    w = report["workload"]
    lines = [
        f"== {report['label']}: concurrency {w['concurrency']}, prompt {w['prompt_tokens']}, output {w['output_tokens']} tokens",
        f"requests {report['requests']}  completed {report['completed']}  errors {report['errors']}  "
        f"short outputs {report['short_outputs']}  tokens from {','.join(report['token_source']) or '-'}",
        f"duration {report['duration_s']:.2f} s  output {report['output_tokens']} tokens  "
        f"{report['output_tok_s']:.1f} tok/s  {report['requests_s']:.2f} req/s",
        f"{'':18}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    rows = [
        ("TTFT (ms)", "ttft_ms"),
        ("ITL (ms)", "itl_ms"),
        ("TPOT (ms)", "tpot_ms"),
        ("E2E (s)", "e2e_s"),
        ("decode tok/s/req", "decode_tok_s"),
    ]
    for title, key in rows:
        d = report[key]
        lines.append(f"{title:18}" + "".join(format_number(d[k]) for k in ("mean", "p50", "p90", "p99")))
    lines += [f"error: {e}" for e in report["error_samples"]]
    return "\n".join(lines)


async def served_model(base_url: str, timeout: float = 10.0) -> str:
    """The first model id of GET /v1/models."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.get(base_url.rstrip("/") + "/v1/models")
        response.raise_for_status()
        data = response.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"])


async def measure(
    base_url: str,
    workload: Workload,
    *,
    label: str = "",
    model: str | None = None,
    timeout: float = 600.0,
    warmup: int = 1,
) -> dict[str, Any]:
    """Run one workload against one server and return its report (the runner's entry point)."""
    model = model or await served_model(base_url)
    results, duration = await run_workload(base_url, model, workload, timeout=timeout, warmup=warmup)
    return summarize(label or base_url, workload, results, duration)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id to send (default: first of /v1/models)")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--num-requests", type=int, default=8)
    p.add_argument("--prompt-tokens", type=parse_range, default=(128, 128), help="N or LOW-HIGH (words)")
    p.add_argument("--output-tokens", type=parse_range, default=(128, 128), help="N or LOW-HIGH")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos / min_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed short requests before measuring")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request read timeout, seconds")
    p.add_argument("--label", default="")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        workload = Workload(
            num_requests=args.num_requests,
            concurrency=args.concurrency,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            seed=args.seed,
            ignore_eos=not args.no_ignore_eos,
            temperature=args.temperature,
        )
        report = asyncio.run(
            measure(args.base_url, workload, label=args.label, model=args.model, timeout=args.timeout, warmup=args.warmup)
        )
    except (ValueError, RuntimeError, httpx.HTTPError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
