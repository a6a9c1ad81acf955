"""The only torch code in app/: a step plan -> tensors -> forward passes -> sampler -> token ids.

Prefill runs one prompt chunk per forward (its shapes depend on that prompt alone: batch invariance,
model/invariance.py); decode runs every decoding row in one forward. The first tokens of prompts that
completed this step are sampled together with the decode rows, in one sampler call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from app.engine.request import Request
from app.engine.scheduler import PrefillChunk, StepPlan
from model.grammar import BatchMasks, TokenMask
from model.invariance import prefill_rows_independent
from model.sampling import Sampler, TokenLogprob, prompt_logprobs

log = logging.getLogger(__name__)


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

    def start(self) -> None:
        self.sampler = Sampler(self.max_batch_size, self.vocab_size, self.device)
        self.masks = BatchMasks(self.max_batch_size, self.vocab_size)
        warm_up = getattr(self.model, "warm_up", None)  # model/static_step.StaticStep: compile every batch bucket now
        if callable(warm_up):
            log.info("compiling the decode step for batch buckets %s", getattr(self.model, "buckets", "?"))
            seconds = warm_up(log_progress)
            reason = getattr(self.model, "fallback_reason", None)
            log.info("decode step ready in %.1f s (%s)", seconds, f"eager: {reason}" if reason else "compiled")

    def prefill_rows_independent(self) -> bool:
        """model/invariance.py's check on the real model (slot 0; before serving); False for models without caches."""
        own_check = getattr(self.model, "prefill_rows_independent", None)  # tensor parallel: on every rank at once
        if callable(own_check):
            return bool(own_check())
        target = getattr(self.model, "model", self.model)  # StaticStep wraps the Transformer; prefill runs eager
        return hasattr(target, "layers") and prefill_rows_independent(target)

    def run(self, plan: StepPlan) -> StepResult:
        assert self.sampler is not None, "start() first"
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
        # The rows sampled this step, known before the forward: their grammar masks are computed meanwhile.
        to_sample = [
            c.request for c in plan.prefill if c.last and c.request.params.max_tokens > 0 and id(c.request) not in failed
        ] + plan.decode
        assert self.masks is not None
        self.masks.start([r.params.grammar for r in to_sample])
        for copy in plan.copies:
            self.model.copy_prefix(copy.source, copy.target, copy.length)  # type: ignore[attr-defined]
        rows: list[Request] = []
        logits: list[torch.Tensor] = []
        for chunk in plan.prefill:
            if id(chunk.request) in failed:
                continue
            last = self._prefill(chunk)
            if last is None:
                continue
            if chunk.request.params.max_tokens == 0:
                result.prompt_done.append(chunk.request)
            else:
                rows.append(chunk.request)
                logits.append(last[None])
        if plan.decode:
            rows += plan.decode
            logits.append(self._decode(plan.decode))
        mask = self.masks.mask(self.device)
        if rows:
            assert rows == to_sample, "the sampled rows differ from those whose masks were computed"
            result.sampled = self._sample(rows, torch.cat(logits), mask)
        return result

    def _prefill(self, chunk: PrefillChunk) -> torch.Tensor | None:
        """Read one prompt chunk into the request's slot; the last prompt token's logits once the prompt is in."""
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
            return None
        return logits[0, -1] if logits.dim() == 3 else logits[0]

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
