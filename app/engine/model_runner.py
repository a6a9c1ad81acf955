"""The only torch code in app/: a step plan -> tensors -> forward passes -> sampler -> token ids.

A step runs in two halves. `run_prefill`: the prompt chunks, one forward per chunk or, where prefill
rows were checked independent of what shares their forward (model/invariance.py), several prompts'
chunks packed into one; then the first token of each prompt completed. `run_decode`: every decoding
row in one forward, then their next tokens. The engine sends the first half's tokens before the second
runs, so time to first token does not include the running streams' decode forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from app.engine.prefix_cache import PrefixCache
from app.engine.request import Request
from app.engine.scheduler import PrefillChunk, StepPlan
from model.grammar import BatchMasks, TokenMask
from model.invariance import packed_prefill_inputs, prefill_rows_independent
from model.llama import PREFILL_PAD_FROM
from model.sampling import Sampler, TokenLogprob, prompt_logprobs

log = logging.getLogger(__name__)

PACK_SLACK = 64  # tokens a packed chunk may be shorter than its pack's longest (ModelRunner._packs)


class CausalLM(Protocol):
    """What the engine needs of a model (model.llama.Transformer is one; tests script others).

    Called with tokens and positions [B, T], the KV slot of each row (None: row b is slot b), and how
    many cached keys to read; returns next-token logits [B, V] for the last position, or [B, T, V] of
    every position with all_logits.
    """

    max_batch_size: int
    max_seq_len: int

    @property
    def vocab_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None,
        *,
        kv_len: int,
        all_logits: bool = False,
    ) -> torch.Tensor: ...


def log_progress(done: int, total: int, bucket: int, seconds: float) -> None:
    """One line per compiled batch bucket, as a bar: start-up on a cold cache takes a while."""
    log.info("compiling [%s%s] %d/%d (batch %d: %.1f s)", "#" * done, "." * (total - done), done, total, bucket, seconds)


@dataclass
class Sampled:
    request: Request
    token_id: int
    logprob: TokenLogprob | None


@dataclass
class StepResult:
    sampled: list[Sampled] = field(default_factory=list)
    prompt_done: list[Request] = field(default_factory=list)  # whole prompt read, nothing to sample (max_tokens 0)
    failed: list[tuple[Request, Exception]] = field(default_factory=list)  # this request only


class ModelRunner:
    def __init__(self, model: CausalLM, max_batch_size: int) -> None:
        self.model = model
        self.device = model.device
        self.max_batch_size = max_batch_size
        self.vocab_size = model.vocab_size  # read once: tests swap the forward for a plain function
        # Built by start() on the engine thread, the only thread that runs parallel torch ops: every live
        # thread that runs one keeps its own OpenMP pool, and with more pool threads than cores libgomp
        # stops spin-waiting (decode got ~1.7x slower).
        self.sampler: Sampler | None = None
        self.masks: BatchMasks | None = None
        # Several prompts' chunks in one forward (model/invariance.packed_prefill_inputs): set by the engine
        # once it knows that prefill rows do not depend on what shares their forward (prefill_rows_independent).
        self.pack_prefill = False

    def start(self) -> None:
        self.sampler = Sampler(self.max_batch_size, self.vocab_size, self.device)
        self.masks = BatchMasks(self.max_batch_size, self.vocab_size)
        warm_up = getattr(self.model, "warm_up", None)  # model/static_step.StaticStep: compile every batch bucket now
        if callable(warm_up):
            log.info("compiling the decode step for batch buckets %s", getattr(self.model, "buckets", "?"))
            seconds = warm_up(log_progress)
            reason = getattr(self.model, "fallback_reason", None)
            log.info("decode step ready in %.1f s (%s)", seconds, f"eager: {reason}" if reason else "compiled")

    def check_prefill_rows(self, prefix_cache: PrefixCache) -> None:
        """Whether prompts may share prefill forwards (`pack_prefill`) and the cache may reuse keys inside a
        chunk: both keep outputs the same bits only if prefill rows do not depend on their chunk or
        neighbours, which a batch-invariant model checks on this machine (model/invariance.py); without
        batch invariance nothing is bit-exact anyway, and both are on. Call before serving."""
        packing_possible = hasattr(self.model, "scratch_position") and self.max_batch_size > 1
        if not prefix_cache.exact:
            self.pack_prefill = packing_possible
            return
        if not (packing_possible or prefix_cache.enabled):
            return
        independent = self.prefill_rows_independent()
        prefix_cache.rows_independent = independent
        self.pack_prefill = independent and packing_possible
        log.info(
            "prefill: %s; prefix cache: exact reuse %s",
            "prompts share forwards" if self.pack_prefill else "one prompt per forward",
            "at any point" if prefix_cache.reuses_within_chunks else "at prefill-chunk boundaries only",
        )
        if not independent:
            log.info("prefill rows on this machine depend on their chunk and neighbours (model/invariance.py)")

    def prefill_rows_independent(self) -> bool:
        """model/invariance.py's check on the real model (slot 0; before serving); False for models without caches."""
        own_check = getattr(self.model, "prefill_rows_independent", None)  # tensor parallel: on every rank at once
        if callable(own_check):
            return bool(own_check())
        target = getattr(self.model, "model", self.model)  # StaticStep wraps the Transformer; prefill runs eager
        return hasattr(target, "layers") and prefill_rows_independent(target)

    def run_prefill(self, plan: StepPlan) -> StepResult:
        """Everything but the decode forward: new requests' sampling state, prefix copies, the prompt
        chunks, and the first token of every prompt completed this step. The engine sends those before
        it runs the decode rows (`run_decode`): a new stream's first token does not wait for the others'."""
        assert self.sampler is not None and self.masks is not None, "start() first"
        result = StepResult()
        failed: set[int] = set()
        for request in plan.admitted:
            params = request.params
            suppress = sorted(request.stop_ids) if params.min_tokens > 0 else ()
            try:
                self.sampler.set_slot(request.slot, params.sampling, params.prompt_ids, suppress)
            except Exception as e:  # noqa: BLE001 - one bad request (e.g. a logit_bias id past validation) fails alone
                result.failed.append((request, e))
                failed.add(id(request))
        chunks = [c for c in plan.prefill if id(c.request) not in failed]
        # The rows sampled now, known before the forwards: their grammar masks are computed meanwhile.
        to_sample = [c.request for c in chunks if c.last and c.request.params.max_tokens > 0]
        self.masks.start([r.params.grammar for r in to_sample])
        for copy in plan.copies:
            self.model.copy_prefix(copy.source, copy.target, copy.length)  # type: ignore[attr-defined]
            if copy.moves_request:
                self.sampler.move_slot(copy.source, copy.target)
        last_logits: dict[int, torch.Tensor] = {}
        for group in self._packs(chunks):
            for chunk, last in zip(group, self._prefill(group)):
                if last is None:
                    continue
                if chunk.request.params.max_tokens == 0:
                    result.prompt_done.append(chunk.request)
                else:
                    last_logits[id(chunk.request)] = last
        mask = self.masks.mask(self.device)
        if to_sample:
            assert set(last_logits) == {id(r) for r in to_sample}, "the sampled rows differ from those whose masks were computed"
            result.sampled = self._sample(to_sample, torch.stack([last_logits[id(r)] for r in to_sample]), mask)
        return result

    def run_decode(self, plan: StepPlan) -> StepResult:
        """One forward for every decoding row, and their next tokens."""
        assert self.masks is not None, "start() first"
        if not plan.decode:
            return StepResult()
        self.masks.start([r.params.grammar for r in plan.decode])
        logits = self._decode(plan.decode)
        return StepResult(sampled=self._sample(plan.decode, logits, self.masks.mask(self.device)))

    def _packs(self, chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
        """The step's prompt chunks grouped into forwards (see `pack_prefill`), longest first within each.

        A chunk joins a pack whose longest chunk is at most PACK_SLACK tokens longer (every row is padded
        to the longest: past that the padding costs more than the forward it saves). Chunks shorter than
        PREFILL_PAD_FROM run alone on their own kernels (model/llama.py), as do those that want every
        position's logits (prompt logprobs).
        """
        if not self.pack_prefill:
            return [[c] for c in chunks]
        alone = [c.length < PREFILL_PAD_FROM or c.request.prompt_logprobs is not None for c in chunks]
        packable = sorted((c for c, solo in zip(chunks, alone) if not solo), key=lambda c: -c.length)
        packs: list[list[PrefillChunk]] = []
        for chunk in packable:
            if packs and packs[-1][0].length - chunk.length <= PACK_SLACK:
                packs[-1].append(chunk)
            else:
                packs.append([chunk])
        return packs + [[c] for c, solo in zip(chunks, alone) if solo]

    def _prefill(self, chunks: list[PrefillChunk]) -> list[torch.Tensor | None]:
        """Read prompt chunks into their requests' slots in one forward; for each, the last prompt
        token's logits once its prompt is in, else None."""
        if len(chunks) > 1:
            rows = [(c.request.tokens[c.start : c.start + c.length], c.start) for c in chunks]
            tokens, positions = packed_prefill_inputs(rows, self.model.scratch_position, self.device)  # type: ignore[attr-defined]
            slots = self._slot_tensor([c.request.slot for c in chunks])
            logits = self.model(tokens, positions, slots, kv_len=max(c.start + c.length for c in chunks))
            for chunk in chunks:
                chunk.request.cached(chunk.length)
            return [logits[row] if chunk.last else None for row, chunk in enumerate(chunks)]
        chunk = chunks[0]
        request, start, n = chunk.request, chunk.start, chunk.length
        logits = self.model(
            torch.tensor([request.tokens[start : start + n]], device=self.device),
            torch.arange(start, start + n, device=self.device)[None],
            self._slot_tensor([request.slot]),
            kv_len=start + n,
            all_logits=request.prompt_logprobs is not None,
        )
        if request.prompt_logprobs is not None:  # logits[t] predicts the prompt token after it
            next_ids = request.params.prompt_ids[start + 1 : start + n + 1]
            top = request.params.sampling.logprobs or 0
            request.prompt_logprobs.extend(prompt_logprobs(logits[0, : len(next_ids)], next_ids, top))
        request.cached(n)
        if not chunk.last:
            return [None]
        return [logits[0, -1] if logits.dim() == 3 else logits[0]]

    def _decode(self, requests: list[Request]) -> torch.Tensor:
        positions = [len(r.tokens) - 1 for r in requests]
        logits = self.model(
            torch.tensor([[r.tokens[-1]] for r in requests], device=self.device),
            torch.tensor([[p] for p in positions], device=self.device),
            self._slot_tensor([r.slot for r in requests]),
            kv_len=max(positions) + 1,
        )
        for request in requests:
            request.cached(1)
        return logits

    def _sample(self, rows: list[Request], logits: torch.Tensor, mask: TokenMask | None) -> list[Sampled]:
        assert self.sampler is not None
        suppress = [r.num_generated < r.params.min_tokens for r in rows]  # stop ids banned before min_tokens
        out = self.sampler.sample(logits, [r.slot for r in rows], suppress, mask)
        return [Sampled(r, out.token_ids[i], out.logprobs[i] if out.logprobs is not None else None) for i, r in enumerate(rows)]

    def _slot_tensor(self, slots: Sequence[int]) -> torch.Tensor | None:
        """None when row b is slot b (the cache is then read as a view, not gathered)."""
        if list(slots) == list(range(len(slots))):
            return None
        return torch.tensor(list(slots), device=self.device)
