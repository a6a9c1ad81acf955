"""Prefix caching on the static slots: a finished request leaves its tokens' keys and values in its slot,
and the next request whose prompt starts the same way takes that slot and prefills only the rest.

No memory moves: the cache is the slot table. The scheduler asks `choose` for a slot when it admits a
request (the free slot whose held tokens share the longest prefix with the prompt, else the least
recently used one), `hold` records what a slot holds as its request computes it, and `release` what
stays reusable when the request ends.

Exactness. With a batch-invariant model (model/invariance.py), outputs with the cache must be the same
bits as without it, so a slot only offers keys that a cold prefill of the new prompt would compute
identically:
- Prefill chunks are cut at multiples of `chunk` from the prompt's start (the scheduler), cache or
  not; after a cached prefix the first chunk runs from the reuse point to the next boundary.
- Keys reused or recomputed in a chunk of another length are the same bits only because prefill rows do
  not depend on their chunk, which `rows_independent` says was checked on this machine
  (model/invariance.py: prefill_rows_independent) for chunks of at least `dense_from` tokens (shorter
  ones run other kernels). Where it was not, or a chunk would be shorter, reuse stops at a chunk
  boundary, where the recomputed chunks are the cold prefill's own.
- Generated tokens' keys come from decode kernels, not prefill ones: only prompt positions are offered.
Without batch invariance nothing is bit-exact anyway, and every cached token (generated ones too) is
offered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from model.llama import PREFILL_PAD_FROM


@dataclass
class SlotContent:
    tokens: list[int] = field(default_factory=list)  # their keys/values are in the slot, reusable
    last_used: float = 0.0  # time.monotonic() when its last request ended (0: never used)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
    hits: int = 0  # of which served from the cache (vLLM's prefix_cache_hits)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix. A binary search over slice comparisons (C loops): admission
    compares a prompt with every slot each step, and an element-wise Python loop over 32 slots x 2,000
    tokens took milliseconds."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid
    return low


class PrefixCache:
    def __init__(
        self,
        num_slots: int,
        chunk: int,
        *,
        enabled: bool = True,
        exact: bool = True,
        rows_independent: bool = False,
        dense_from: int = PREFILL_PAD_FROM,
    ) -> None:
        self.enabled = enabled
        self.chunk = chunk
        self.exact = exact
        self.rows_independent = rows_independent  # set by the engine once it has checked the model
        self.dense_from = dense_from
        self.slots = [SlotContent() for _ in range(num_slots)]
        self.stats = PrefixCacheStats()

    @property
    def reuses_within_chunks(self) -> bool:
        """Reuse may end inside a prefill chunk: rows were checked independent, and chunks are long enough to be dense."""
        return self.rows_independent and self.chunk >= self.dense_from

    def choose(self, free: list[int], prompt: list[int], use_cache: bool = True, count: bool = True) -> tuple[int, int]:
        """(slot, reusable prefix length) for a prompt among the free slots: the longest reusable prefix,
        the least recently used slot among equals (and on a miss). use_cache=False: LRU, nothing reused.
        count=False leaves the statistics alone (the engine's own work is no query)."""
        best_slot, best_reuse = -1, -1
        for slot in sorted(free):
            reuse = self.reusable(self.slots[slot].tokens, prompt) if self.enabled and use_cache else 0
            if reuse > best_reuse or (reuse == best_reuse and self.slots[slot].last_used < self.slots[best_slot].last_used):
                best_slot, best_reuse = slot, reuse
        if self.enabled and count:
            self.stats.queries += len(prompt)
            self.stats.hits += best_reuse
        return best_slot, best_reuse

    def reusable(self, held: list[int], prompt: list[int]) -> int:
        """How many leading prompt tokens may be taken from a slot holding `held` (see the module doc).
        The last prompt token is always recomputed: its logits give the first generated token."""
        n = len(prompt)
        reuse = min(common_prefix(held, prompt), n - 1)
        if reuse <= 0 or not self.exact:
            return max(reuse, 0)
        chunk_start = reuse // self.chunk * self.chunk
        if not self.reuses_within_chunks:
            return chunk_start
        chunk_end = min(n, chunk_start + self.chunk)
        if chunk_end - chunk_start < self.dense_from:  # the cold prefill runs this chunk on other kernels
            return chunk_start
        return max(chunk_start, min(reuse, chunk_end - self.dense_from))  # the first recomputed chunk stays dense

    def start(self, slot: int, prompt: list[int], reuse: int) -> None:
        """A request took the slot: only its reused prefix is still valid there."""
        self.slots[slot].tokens = prompt[:reuse]

    def computed(self, slot: int, tokens: list[int], start: int, length: int) -> None:
        """A prefill chunk [start, start + length) of `tokens` is in the slot: extend what it offers if the
        chunk continues it and (exact) ran on the dense prefill kernels."""
        content = self.slots[slot]
        if not self.enabled or len(content.tokens) != start or (self.exact and length < self.dense_from and length != self.chunk):
            return
        content.tokens = tokens[: start + length]

    def release(self, slot: int, tokens: list[int], num_cached: int, failed: bool = False) -> None:
        """The slot's request ended: without exactness every token with keys in the slot is offered;
        with it, what `computed` recorded; after a failure, nothing."""
        content = self.slots[slot]
        content.last_used = time.monotonic()
        if failed or not self.enabled:
            content.tokens = []
        elif not self.exact:
            content.tokens = tokens[:num_cached]

    def move(self, source: int, target: int) -> None:
        """What `source` holds now lives in `target` (the scheduler copied its keys there); `source` holds nothing."""
        self.slots[target], self.slots[source] = self.slots[source], SlotContent()

    def moved(self, source: int, target: int) -> None:
        """A running request moved from `source` to `target` with its keys: what it holds goes along, and
        `source`, whose keys stay where they were, keeps offering the same tokens."""
        content = self.slots[source]
        self.slots[target] = content
        self.slots[source] = SlotContent(list(content.tokens), time.monotonic())

    def forget_all(self) -> None:
        for content in self.slots:
            content.tokens = []

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        """What each slot holds (for /debug/slots and the playground)."""
        now = time.monotonic() if now is None else now
        return [
            {"slot": i, "cached_tokens": len(c.tokens), "idle_s": round(now - c.last_used, 3) if c.last_used else None}
            for i, c in enumerate(self.slots)
        ]
