"""Prometheus metrics on a per-app CollectorRegistry (tests build many apps in one process).

Gauges are read from `engine.stats()` at scrape time; counters and histograms are fed by the server as
requests finish, from the engine's timings (arrival, scheduled, first token, finished).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series only add noise to every scrape

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    """All llamaserve_* series of one app."""

    def __init__(self, stats: Callable[[], Any] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stats = stats
        r = self.registry
        self.running = Gauge("llamaserve_requests_running", "Requests holding a KV-cache slot", registry=r)
        self.waiting = Gauge("llamaserve_requests_waiting", "Requests queued for a slot", registry=r)
        self.slot_usage = Gauge("llamaserve_slot_usage_ratio", "Fraction of KV-cache slots in use (0..1)", registry=r)
        self.prompt_tokens = Counter("llamaserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("llamaserve_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "llamaserve_requests_finished", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "llamaserve_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inter_token = Histogram(
            "llamaserve_inter_token_latency_seconds", "Time between generated tokens", buckets=TOKEN_BUCKETS, registry=r
        )
        self.e2e = Histogram("llamaserve_e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS, registry=r)
        # vLLM's names and meaning (in tokens): prompt tokens looked up, and of those found in the cache.
        self.prefix_queries = Counter(
            "llamaserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter("llamaserve_prefix_cache_hits", "Prompt tokens served from the prefix cache", registry=r)
        self._prefix_seen = (0, 0)
        self.queue_time = Histogram(
            "llamaserve_request_queue_time_seconds", "Arrival to getting a slot", buckets=LATENCY_BUCKETS, registry=r
        )

    def bind(self, stats: Callable[[], Any]) -> None:
        """Read gauges from this engine stats function (set once the engine exists)."""
        self._stats = stats

    def render(self) -> bytes:
        """The text exposition format, gauges refreshed first."""
        if self._stats is not None:
            stats = self._stats()
            self.running.set(stats.running)
            self.waiting.set(stats.waiting)
            self.slot_usage.set(stats.running / max(stats.max_batch_size, 1))
            queries, hits = getattr(stats, "prefix_cache_queries", 0), getattr(stats, "prefix_cache_hits", 0)
            self.prefix_queries.inc(max(queries - self._prefix_seen[0], 0))
            self.prefix_hits.inc(max(hits - self._prefix_seen[1], 0))
            self._prefix_seen = (queries, hits)
        return generate_latest(self.registry)

    def observe_tokens(self, gaps: list[float]) -> None:
        """Inter-token gaps seen by the server (a gap spread evenly over tokens arriving together)."""
        for gap in gaps:
            self.inter_token.observe(gap)

    def observe_finished(self, finish_reason: str | None, prompt_tokens: int, generated_tokens: int, timings: Any) -> None:
        """One finished request: token counters, reason, and the latencies its timings allow."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.finished.labels(finish_reason=finish_reason or "abort").inc()
        if timings is None:
            return
        arrival = getattr(timings, "arrival", None)
        scheduled = getattr(timings, "scheduled", None)
        first = getattr(timings, "first_token", None)
        finished = getattr(timings, "finished", None)
        if arrival is None:
            return
        if scheduled is not None:
            self.queue_time.observe(max(scheduled - arrival, 0.0))
        if first is not None:
            self.ttft.observe(max(first - arrival, 0.0))
        if finished is not None:
            self.e2e.observe(max(finished - arrival, 0.0))
