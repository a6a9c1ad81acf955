"""The engine's last minute, for the playground's live panel (GET /engine/snapshot).

The engine thread appends one record per step and one per first token to bounded deques; the summary
(per-second series, tok/s, step time, a TTFT histogram) is computed only when a page asks, a few times
a second. So an open page costs a step two appends under an uncontended lock, whatever it polls.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

WINDOW_S = 60  # what the panel shows: the last minute, in one-second buckets
# Upper bounds (seconds) of the TTFT histogram's bars; one more bar counts everything slower.
TTFT_BOUNDS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class StepRecord:
    end: float  # time.monotonic() when the step ended
    duration: float  # seconds
    generated: int  # tokens sampled for requests this step
    prefilled: int  # prompt tokens written to the cache this step
    rows: int  # requests holding a slot during the step


class EngineTelemetry:
    """Bounded history of steps and first tokens; thread-safe (written by the engine, read by HTTP)."""

    def __init__(self, window_s: int = WINDOW_S, max_steps: int = 50_000, max_first_tokens: int = 10_000) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._steps: deque[StepRecord] = deque(maxlen=max_steps)
        self._first_tokens: deque[tuple[float, float]] = deque(maxlen=max_first_tokens)  # (when, seconds since arrival)

    def record_step(self, end: float, duration: float, generated: int, prefilled: int, rows: int) -> None:
        with self._lock:
            self._steps.append(StepRecord(end, duration, generated, prefilled, rows))

    def record_first_token(self, at: float, ttft_s: float) -> None:
        with self._lock:
            self._first_tokens.append((at, ttft_s))

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """The last window: totals, one bucket per second (oldest first), and the TTFT histogram."""
        now = time.monotonic() if now is None else now
        start = now - self.window_s
        with self._lock:
            steps = [s for s in self._steps if s.end > start]
            ttfts = [t for at, t in self._first_tokens if at > start]
        series = [{"generated": 0, "prefilled": 0, "steps": 0, "busy_s": 0.0} for _ in range(self.window_s)]
        for s in steps:
            bucket = series[min(int(s.end - start), self.window_s - 1)]
            bucket["generated"] += s.generated
            bucket["prefilled"] += s.prefilled
            bucket["steps"] += 1
            bucket["busy_s"] += s.duration
        per_second = [
            {
                "generated_tok_s": b["generated"],
                "prefill_tok_s": b["prefilled"],
                "steps": b["steps"],
                "step_ms": round(1000 * b["busy_s"] / b["steps"], 2) if b["steps"] else None,
            }
            for b in series
        ]
        busy = sum(s.duration for s in steps)
        counts = [0] * (len(TTFT_BOUNDS_S) + 1)
        for t in ttfts:
            counts[next((i for i, bound in enumerate(TTFT_BOUNDS_S) if t <= bound), len(TTFT_BOUNDS_S))] += 1
        ordered = sorted(ttfts)
        return {
            "window_s": self.window_s,
            "generated_tok_s": round(sum(s.generated for s in steps) / self.window_s, 2),
            "prefill_tok_s": round(sum(s.prefilled for s in steps) / self.window_s, 2),
            "steps": len(steps),
            "step_ms_mean": round(1000 * busy / len(steps), 2) if steps else None,
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
