"""Next-token sampling for a batch of rows, each with its own parameters, in one batched pass.

Order of operations (vLLM v1's): raw logits -> logprobs (of the raw logits) -> logit_bias, the
grammar's allowed tokens (model/grammar.py) and min_tokens suppression -> repetition penalty (HF:
prompt + generated) -> presence / frequency penalties (OpenAI: generated only) -> temperature ->
min_p -> top_k -> top_p -> one draw per row.

Why the pieces look the way they do:
- Per-slot state lives in tensors ([max_batch, vocab] counts, prompt mask, bias), updated with one
  index_put_ per step, so no per-row Python loop ever touches the vocabulary.
- A seeded row draws its one uniform per step from its own torch.Generator and picks the token by
  inverse CDF over its filtered distribution, so its output does not depend on the other rows.
- Work no row needs is skipped: the sort (top_p), the top-k threshold, penalties, logprobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from model.grammar import TokenMask

LOGPROB_FLOOR = -9999.0  # logprobs are clamped here so JSON never carries -inf
MAX_LOGPROBS = 20  # OpenAI chat top_logprobs range (the legacy endpoint limits itself to 5)
TOP_P_CANDIDATES = 128  # first guess of how many best tokens hold any row's top_p mass
# Below this temperature a row is greedy (vLLM's rule): x / T overflows fp32 for T ~ 1e-37, and the
# softmax of inf is NaN. A repetition penalty is applied as at least MIN_PENALTY for the same reason
# (a value that rounds to 0 in fp32 divided the seen logits by zero).
GREEDY_BELOW = 1e-5
MIN_PENALTY = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # alternatives per token (0..20); None = no logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # finite (clamped at LOGPROB_FLOOR)
    top: list[tuple[int, float]]  # the `logprobs` most likely (id, logprob), best first


class SamplingParamError(ValueError):
    """A sampling parameter out of range; `param` names the offending field (OpenAI's error.param)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# field -> (lowest, highest, lowest allowed?, message); ranges follow OpenAI, extras follow vLLM.
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "temperature": (0.0, 100.0, True, "temperature must be in [0, 100]"),
    "top_p": (0.0, 1.0, False, "top_p must be in (0, 1]"),
    "min_p": (0.0, 1.0, True, "min_p must be in [0, 1]"),
    "presence_penalty": (-2.0, 2.0, True, "presence_penalty must be in [-2, 2]"),
    "frequency_penalty": (-2.0, 2.0, True, "frequency_penalty must be in [-2, 2]"),
    "repetition_penalty": (0.0, 100.0, False, "repetition_penalty must be in (0, 100]"),
}


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_sampling(params: SamplingParams, vocab_size: int) -> None:
    """Raise SamplingParamError for any value the sampler cannot honour (checked before admission)."""
    for name, (low, high, low_ok, message) in _RANGES.items():
        value = getattr(params, name)
        if not _finite_number(value) or not (low <= value <= high) or (value == low and not low_ok):
            raise SamplingParamError(message, name)
    if not isinstance(params.top_k, int) or params.top_k < -1:
        raise SamplingParamError("top_k must be -1 (off), 0 (off) or >= 1", "top_k")
    if params.seed is not None and not isinstance(params.seed, int):
        raise SamplingParamError("seed must be an integer", "seed")
    if params.logprobs is not None and (not isinstance(params.logprobs, int) or not 0 <= params.logprobs <= MAX_LOGPROBS):
        raise SamplingParamError(f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
    for token_id, bias in params.logit_bias.items():
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise SamplingParamError(
                f"logit_bias token id {token_id} is not in the vocabulary (0..{vocab_size - 1})", "logit_bias"
            )
        if not _finite_number(bias) or not -100.0 <= bias <= 100.0:
            raise SamplingParamError(f"logit_bias value for token {token_id} must be in [-100, 100]", "logit_bias")


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None  # per row; None when no row asked for logprobs


class Sampler:
    """Per-slot sampling state plus the batched sampling step. Not thread-safe: the engine thread owns it."""

    def __init__(self, max_batch_size: int, vocab_size: int, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        shape = (max_batch_size, vocab_size)
        self.counts = torch.zeros(shape, dtype=torch.float32, device=device)  # generated-token counts
        self.in_prompt = torch.zeros(shape, dtype=torch.bool, device=device)
        self.bias = torch.zeros(shape, dtype=torch.float32, device=device)
        self.suppress_ids = torch.zeros(shape, dtype=torch.bool, device=device)  # stop ids banned before min_tokens
        self.params: list[SamplingParams] = [SamplingParams() for _ in range(max_batch_size)]
        self.generators: list[torch.Generator | None] = [None] * max_batch_size
        self.shared = torch.Generator(device=self.device)
        if seed is not None:
            self.shared.manual_seed(seed)
        else:
            self.shared.seed()  # from the OS; torch.seed() would reseed torch's global generator too
        # Per-slot scalars as tensors, so a step gathers them with one index.
        self.temperature = torch.ones(max_batch_size, device=device)
        self.top_p = torch.ones(max_batch_size, device=device)
        self.top_k = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self.min_p = torch.zeros(max_batch_size, device=device)
        self.presence = torch.zeros(max_batch_size, device=device)
        self.frequency = torch.zeros(max_batch_size, device=device)
        self.repetition = torch.ones(max_batch_size, device=device)

    def set_slot(self, slot: int, params: SamplingParams, prompt_ids: Sequence[int], suppress_ids: Sequence[int] = ()) -> None:
        """Give `slot` to a new request. Raises IndexError/ValueError for ids outside the vocabulary."""
        self.params[slot] = params
        self.counts[slot].zero_()
        self.in_prompt[slot].zero_()
        self.bias[slot].zero_()
        self.suppress_ids[slot].zero_()
        if params.repetition_penalty != 1.0:
            self.in_prompt[slot, torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)] = True
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=self.device)
            self.bias[slot, ids] = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=self.device)
        if suppress_ids:
            self.suppress_ids[slot, torch.tensor(list(suppress_ids), dtype=torch.long, device=self.device)] = True
        self.generators[slot] = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed % (1 << 63))
            self.generators[slot] = generator
        self.temperature[slot] = params.temperature if not params.greedy else 1.0
        self.top_p[slot] = params.top_p
        self.top_k[slot] = params.top_k if params.top_k > 0 else self.vocab_size
        self.min_p[slot] = params.min_p
        self.presence[slot] = params.presence_penalty
        self.frequency[slot] = params.frequency_penalty
        self.repetition[slot] = max(params.repetition_penalty, MIN_PENALTY)

    def move_slot(self, source: int, target: int) -> None:
        """The request in `source` continues in `target` (the engine moved its keys there): its state goes with it."""
        per_slot = (self.counts, self.in_prompt, self.bias, self.suppress_ids, self.temperature, self.top_p, self.top_k)
        for state in (*per_slot, self.min_p, self.presence, self.frequency, self.repetition):
            state[target] = state[source]
        self.params[target], self.generators[target] = self.params[source], self.generators[source]
        self.generators[source] = None

    def sample(
        self,
        logits: torch.Tensor,
        slots: Sequence[int],
        suppress: Sequence[bool] | None = None,
        mask: TokenMask | None = None,
    ) -> SampleOutput:
        """Pick one token per row of `logits` (B, V) fp32; row b belongs to slot `slots[b]`.

        `suppress[b]` bans the slot's suppress_ids (stop ids before min_tokens). `mask` restricts some rows
        to their grammar's tokens. Records the chosen tokens in the penalty counts.
        """
        params = [self.params[s] for s in slots]
        index = torch.tensor(list(slots), dtype=torch.long, device=logits.device)
        want_logprobs = [p.logprobs for p in params]
        logprobs = self._logprobs_of(logits, want_logprobs) if any(k is not None for k in want_logprobs) else None

        x = self.processed_logits(logits, slots, suppress, params=params, index=index, mask=mask)
        greedy = [p.greedy for p in params]
        if all(greedy):
            chosen = x.argmax(dim=-1)
        elif not any(greedy):  # a vocabulary-wide argmax costs ~1 ms at batch 32: only when used
            chosen = self._draw(x, slots)
        else:
            chosen = torch.where(torch.tensor(greedy, device=x.device), x.argmax(dim=-1), self._draw(x, slots))
        self.counts.index_put_((index, chosen), torch.ones_like(chosen, dtype=torch.float32), accumulate=True)
        token_ids = chosen.tolist()
        return SampleOutput(token_ids, None if logprobs is None else logprobs(token_ids))

    def processed_logits(
        self,
        logits: torch.Tensor,
        slots: Sequence[int],
        suppress: Sequence[bool] | None = None,
        *,
        params: list[SamplingParams] | None = None,
        index: torch.Tensor | None = None,
        mask: TokenMask | None = None,
    ) -> torch.Tensor:
        """Logits after bias, penalties, temperature and filters (-inf = filtered out).

        Their softmax is the distribution a non-greedy row samples from; their argmax is what a greedy
        row picks (no filter ever removes the best token, and greedy rows use temperature 1).
        """
        params = params if params is not None else [self.params[s] for s in slots]
        index = index if index is not None else torch.tensor(list(slots), dtype=torch.long, device=logits.device)
        x = self._penalised(logits, index, params, suppress, mask)
        return x if all(p.greedy for p in params) else self._filtered(x, index, params)

    def _penalised(
        self,
        logits: torch.Tensor,
        index: torch.Tensor,
        params: list[SamplingParams],
        suppress: Sequence[bool] | None,
        mask: TokenMask | None = None,
    ) -> torch.Tensor:
        x = logits
        if any(p.logit_bias for p in params):
            x = x + self.bias[index]
        banned = None
        if suppress is not None and any(suppress):
            banned = self.suppress_ids[index] & torch.tensor(list(suppress), device=x.device)[:, None]
        if mask is not None:
            if banned is not None:  # min_tokens yields where the grammar allows nothing but a stop
                leaves_some = ((mask.bias == 0) & ~banned[mask.rows]).any(dim=-1)
                banned[mask.rows[~leaves_some]] = False
            x = x.index_add(0, mask.rows, mask.bias)  # -inf where the grammar says no (an add: no boolean select)
        if banned is not None:
            x = x.masked_fill(banned, -math.inf)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = self.in_prompt[index] | (self.counts[index] > 0)
            penalty = self.repetition[index][:, None]
            x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            counts = self.counts[index]
            x = x - counts * self.frequency[index][:, None] - (counts > 0).float() * self.presence[index][:, None]
        return x

    def _filtered(self, x: torch.Tensor, index: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then min_p, top_k, top_p (each only when some row uses it), renormalising between.

        min_p is a logit threshold (p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)), so it needs no
        softmax. top_k and top_p become one per-row logit threshold found among the K best candidates
        (a partial top-k, far cheaper than sorting the vocabulary); only the rows whose top_p mass is
        not reached within K are retried, with a larger K (at batch 32 on SmolLM2, p90 of the nucleus
        is ~120 tokens, its max a few thousand: retrying the whole batch cost ~10 ms a step).
        """
        x = x / self.temperature[index][:, None]
        if any(p.min_p > 0.0 for p in params):
            floor = x.amax(dim=-1, keepdim=True) + torch.log(self.min_p[index])[:, None]
            x = x.masked_fill(x < floor, -math.inf)
        # Each row starts from its own number of candidates and retries alone: what another row of
        # the batch asks for never changes the sums this row's threshold is computed from.
        first = [self._first_candidates(p) for p in params]
        if not any(first):
            return x
        full_norm = x.logsumexp(dim=-1) if any(p.top_p < 1.0 for p in params) else None  # once, not per retry
        threshold = torch.full((x.shape[0], 1), -math.inf, dtype=x.dtype, device=x.device)
        pending: dict[int, list[int]] = {}  # candidates -> rows still to decide with that many
        for row, candidates in enumerate(first):
            if candidates:
                pending.setdefault(candidates, []).append(row)
        while pending:
            candidates, rows = pending.popitem()
            at = torch.tensor(rows, device=x.device)
            found, undecided = self._threshold(x[at], index[at], candidates, None if full_norm is None else full_norm[at])
            threshold[at] = found
            retry = at[undecided].tolist()
            if retry:  # usually one or two rows: only they pay for the larger topk
                pending.setdefault(min(candidates * 4, self.vocab_size), []).extend(retry)
        return x.masked_fill_(x < threshold, -math.inf)  # x is a fresh tensor (divided by temperature)

    def _first_candidates(self, params: SamplingParams) -> int:
        """How many best tokens a row's first top-k/top-p pass looks at (0: it filters nothing)."""
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else 0
        wanted = max(top_k, TOP_P_CANDIDATES if params.top_p < 1.0 else 0)
        return min(wanted, self.vocab_size)

    def _threshold(
        self, x: torch.Tensor, index: torch.Tensor, candidates: int, full_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row smallest logit kept by top_k then top_p, and which rows `candidates` could not decide."""
        values = x.topk(candidates, dim=-1).values  # sorted, best first
        k = self.top_k[index].clamp(max=candidates)
        rank = torch.arange(candidates, device=x.device)
        values = values.masked_fill(rank[None, :] >= k[:, None], -math.inf)  # top_k (no-op rows: k = V)
        kept = torch.isfinite(values)
        undecided = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if full_norm is not None:  # some row uses top_p
            top_p = self.top_p[index][:, None]
            has_k = self.top_k[index] < self.vocab_size
            # The distribution top_p sees: after top_k its mass lies within the candidates, else all of x.
            norm = torch.where(has_k, values.logsumexp(dim=-1), full_norm)[:, None]
            probs = torch.exp(values - norm)
            cumulative = probs.cumsum(dim=-1)
            uses_p = top_p < 1.0
            kept &= ((cumulative - probs) <= top_p) | ~uses_p
            if candidates < self.vocab_size:
                undecided = kept[:, -1] & (cumulative[:, -1] < top_p[:, 0]) & uses_p[:, 0] & ~has_k
        last_kept = kept.sum(dim=-1, keepdim=True).clamp(min=1) - 1
        threshold = values.gather(1, last_kept)
        no_filter = (self.top_k[index] >= self.vocab_size) & (self.top_p[index] >= 1.0)
        return threshold.masked_fill(no_filter[:, None], -math.inf), undecided

    def _draw(self, x: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """One uniform per row (the slot's own generator when seeded) through the inverse CDF."""
        probs = torch.softmax(x, dim=-1)
        cdf = probs.cumsum(dim=-1)
        uniform = torch.rand(len(slots), generator=self.shared, device=x.device)
        for row, slot in enumerate(slots):
            generator = self.generators[slot]
            if generator is not None:
                uniform[row] = torch.rand(1, generator=generator, device=x.device)[0]
        total = cdf[:, -1:]
        # Strictly below the total (uniform * total can round up to it), so the first cdf entry above
        # the target is one where the cdf grows: a token with mass, never a filtered one.
        target = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).squeeze(1)

    def _logprobs_of(self, logits: torch.Tensor, wanted: list[int | None]) -> Callable[[list[int]], list[TokenLogprob | None]]:
        """log_softmax of the raw logits; returns a function of the chosen ids -> per-row TokenLogprob."""
        logp = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOGPROB_FLOOR)
        k = min(max(w or 0 for w in wanted), logp.shape[-1])  # a toy vocabulary may be smaller than k
        top = logp.topk(k, dim=-1) if k > 0 else None
        top_ids: list[list[int]] = top.indices.tolist() if top is not None else []
        top_vals: list[list[float]] = top.values.tolist() if top is not None else []

        def finish(token_ids: list[int]) -> list[TokenLogprob | None]:
            chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None]).squeeze(1).tolist()
            out: list[TokenLogprob | None] = []
            for row, n in enumerate(wanted):
                if n is None:
                    out.append(None)
                    continue
                alternatives = list(zip(top_ids[row][:n], top_vals[row][:n])) if top is not None else []
                out.append(TokenLogprob(token_ids[row], chosen[row], alternatives))
            return out

        return finish


def prompt_logprobs(logits: torch.Tensor, next_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Logprobs of `next_ids[t]` under `logits[t]` (T, V), with the top k alternatives (echo + logprobs)."""
    logp = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOGPROB_FLOOR)
    ids = torch.tensor(list(next_ids), dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, ids[:, None]).squeeze(1).tolist()
    top_ids: list[list[int]] = [[] for _ in chosen]
    top_vals: list[list[float]] = [[] for _ in chosen]
    if k > 0:
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        top_ids, top_vals = top.indices.tolist(), top.values.tolist()
    return [TokenLogprob(int(i), lp, list(zip(a, b))) for i, lp, a, b in zip(next_ids, chosen, top_ids, top_vals)]
