"""The engine's last minute, for the playground's live panel (GET /engine/snapshot).

The engine thread adds each step to its second's bucket and each first token to a bounded deque; the
summary (per-second series, tok/s, step time, a TTFT histogram) is built from at most 60 buckets only
when a page asks, a few times a second (bench/engine_snapshot.py measures what that costs a step).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

WINDOW_S = 60  # what the panel shows: the last minute, in one-second buckets
# Upper bounds (seconds) of the TTFT histogram's bars; one more bar counts everything slower.
TTFT_BOUNDS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineTelemetry:
    """Per-second step totals and first-token times over the last minute; thread-safe (written by the
    engine thread, read by HTTP). A step updates one bucket; a summary reads at most 60 of them."""

    def __init__(self, window_s: int = WINDOW_S, max_first_tokens: int = 10_000) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        # [second, generated tokens, prefilled tokens, steps, busy seconds], one per second that had a step
        self._seconds: deque[list[float]] = deque()
        self._first_tokens: deque[tuple[float, float]] = deque(maxlen=max_first_tokens)  # (when, seconds since arrival)

    def record_step(self, end: float, duration: float, generated: int, prefilled: int) -> None:
        second = int(end)
        with self._lock:
            if not self._seconds or self._seconds[-1][0] != second:
                self._seconds.append([second, 0, 0, 0, 0.0])
                while self._seconds[0][0] <= second - self.window_s:
                    self._seconds.popleft()
            bucket = self._seconds[-1]
            bucket[1] += generated
            bucket[2] += prefilled
            bucket[3] += 1
            bucket[4] += duration

    def record_first_token(self, at: float, ttft_s: float) -> None:
        with self._lock:
            self._first_tokens.append((at, ttft_s))
            while self._first_tokens[0][0] < at - self.window_s:
                self._first_tokens.popleft()

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """The last window_s seconds up to the current one: totals, one bucket per second (oldest first,
        the current second last), and the TTFT histogram."""
        now = time.monotonic() if now is None else now
        last = int(now)
        first = last - self.window_s + 1
        with self._lock:
            buckets = [b.copy() for b in self._seconds if first <= b[0] <= last]
            ttfts = [t for at, t in self._first_tokens if at > now - self.window_s]
        per_second: list[dict[str, Any]] = [
            {"generated_tok_s": 0, "prefill_tok_s": 0, "steps": 0, "step_ms": None} for _ in range(self.window_s)
        ]
        for second, generated, prefilled, count, seconds_busy in buckets:
            per_second[int(second) - first] = {
                "generated_tok_s": int(generated),
                "prefill_tok_s": int(prefilled),
                "steps": int(count),
                "step_ms": round(1000 * seconds_busy / count, 2),
            }
        steps = sum(int(b[3]) for b in buckets)
        busy = sum(b[4] for b in buckets)
        counts = [0] * (len(TTFT_BOUNDS_S) + 1)
        for t in ttfts:
            counts[next((i for i, bound in enumerate(TTFT_BOUNDS_S) if t <= bound), len(TTFT_BOUNDS_S))] += 1
        ordered = sorted(ttfts)
        return {
            "window_s": self.window_s,
            "generated_tok_s": round(sum(b[1] for b in buckets) / self.window_s, 2),
            "prefill_tok_s": round(sum(b[2] for b in buckets) / self.window_s, 2),
            "steps": steps,
            "step_ms_mean": round(1000 * busy / steps, 2) if steps else None,
            "busy_share": round(min(busy / self.window_s, 1.0), 4),  # of the window, the engine was stepping
            "per_second": per_second,
            "ttft": {
                "count": len(ordered),
                "p50_s": round(ordered[len(ordered) // 2], 4) if ordered else None,
                "p90_s": round(ordered[min(int(len(ordered) * 0.9), len(ordered) - 1)], 4) if ordered else None,
                "bounds_s": list(TTFT_BOUNDS_S),
                "counts": counts,  # one more than bounds_s: the last counts everything slower
            },
        }
