"""Grammar-constrained decoding: which tokens a request may sample next, from a grammar engine.

The engine is llguidance (MIT, one Rust wheel with no Python dependencies). bench/grammar_engines.py
measured it against xgrammar on this project's vocabulary (docs/performance.md, "Structured outputs");
xgrammar's wheel also pulls in transformers and triton, which a CPU server image should not carry.

The pieces, in the order a request meets them:
- `grammar_tokenizer(tokenizer)`: the engine's view of our vocabulary (built once per tokenizer, ~1 s).
  Control tokens are 0xFF + their name, llguidance's convention, so a grammar never emits one by
  accident; the tokenizer's stop ids are the engine's EOS: allowed exactly when the grammar accepts.
- `GrammarSpec` -> `compile_grammar()`: a JSON Schema, regex, choice list or Lark grammar, checked
  (a GrammarError names the problem). Callers compile off the event loop and off the engine thread.
- `GrammarMatcher`: one per generation; `fill_bitmask` before a step, `accept` after it.
- `BatchMasks`: a step's masks, filled on a helper thread while the forward runs, handed to the
  sampler as an additive bias (0 allowed, -inf not) of the constrained rows only. The bits are unpacked
  by a byte lookup (torch.nn.functional.embedding): masked_fill with a boolean mask of random pattern
  cost ~4 ms at batch 32 x 49,152 on 2 cores, the lookup plus one add ~2 ms (bench/grammar_engines.py).
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from model.tokenizer import Tokenizer

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
# JSON without free whitespace: ", " and ": " between items, the one-line style models write anyway.
# Free whitespace lets a small model emit newlines until max_tokens; compact JSON parses the same.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}

_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class GrammarError(ValueError):
    """A grammar or schema the engine cannot compile; the message says why (an HTTP 400)."""


def _llguidance() -> Any:
    import llguidance  # imported on first use: a server that never constrains never loads it

    return llguidance


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: token bytes, EOS/BOS ids, and a callable that encodes."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        names = {token_id: text for text, token_id in tokenizer.special_tokens.items()}
        self.tokens: list[bytes] = []
        for token_id in range(vocab_size):  # the model's rows past the tokenizer's ids are never allowed
            if token_id in names:
                self.tokens.append(b"\xff" + names[token_id].encode())
                continue
            piece = tokenizer.token_bytes(token_id) if token_id < tokenizer.vocab_size else b""
            self.tokens.append(piece if piece else b"\xff<unused_%d>" % token_id)  # never produced by text
        self.special_token_ids = sorted(names)
        stops = sorted(tokenizer.stop_ids | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))
        self.eos_token_id = stops[0] if stops else None
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int | None = None) -> Any:
    """llguidance.LLTokenizer for `tokenizer` over `vocab_size` ids (the model's logits; default the
    tokenizer's), cached per tokenizer object: building it takes ~1 s."""
    vocab_size = vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
    by_size = _TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in by_size:
        llg = _llguidance()
        stops = sorted(tokenizer.stop_ids | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))
        wrapper = llg.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size))
        by_size[vocab_size] = llg.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=stops or None)
    return by_size[vocab_size]


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. `value`: a JSON Schema (dict), a regex, a list of choices, or
    a grammar in Lark (llguidance's dialect) or llama.cpp's GBNF (converted to Lark)."""

    kind: GrammarKind
    value: Any = None

    def source(self) -> str:
        """The grammar in llguidance's input format (may raise GrammarError for a malformed value)."""
        llg = _llguidance()
        matcher = llg.LLMatcher
        if self.kind == "json_object":
            return matcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            if not isinstance(self.value, (dict, bool)):
                raise GrammarError("a JSON Schema must be a JSON object")
            try:
                return matcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
            except ValueError as e:
                raise GrammarError(f"invalid JSON Schema: {e}") from None
        if self.kind == "regex":
            if not isinstance(self.value, str) or not self.value:
                raise GrammarError("a regex must be a non-empty string")
            return matcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return matcher.grammar_from_lark(choice_lark(self.value))
        if self.kind == "grammar":
            if not isinstance(self.value, str) or not self.value.strip():
                raise GrammarError("a grammar must be a non-empty string")
            from llguidance.gbnf_to_lark import any_to_lark

            try:
                return matcher.grammar_from_lark(any_to_lark(self.value))
            except Exception as e:  # noqa: BLE001 - the converter raises whatever its parser hits
                raise GrammarError(f"cannot read the grammar as Lark or GBNF: {e}") from None
        raise GrammarError(f"unknown grammar kind {self.kind!r}")


def choice_lark(choices: Sequence[str]) -> str:
    """A Lark grammar that matches exactly one of `choices` (JSON string literals are Lark literals)."""
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def json_lark(schema: dict[str, Any]) -> str:
    """A Lark fragment for one JSON value of `schema` (compact, as JSON_OPTIONS), to embed in a larger grammar."""
    options = {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}} if isinstance(schema, dict) else schema
    return "%json " + json.dumps(options, ensure_ascii=False)


def _first_line(message: str) -> str:
    """llguidance errors end with a caret drawing of the grammar; the first lines say what is wrong."""
    return message.strip().split("\n   1 |")[0].strip()


class GrammarMatcher:
    """The grammar state of one generation: which tokens may come next, fed each sampled token.

    Building one compiles the grammar (llguidance builds its lexer: up to ~1 s for a big schema), so
    callers build it off the event loop and off the engine thread, then `copy()` it per choice.
    """

    def __init__(self, spec: GrammarSpec, tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
        llg = _llguidance()
        self.spec = spec
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self._matcher = llg.LLMatcher(grammar_tokenizer(tokenizer, self.vocab_size), spec.source(), log_level=0)
        if self._matcher.is_error():
            raise GrammarError(_first_line(self._matcher.get_error()))

    def copy(self) -> "GrammarMatcher":
        """An independent matcher in the same state (the n choices of one request)."""
        clone = object.__new__(GrammarMatcher)
        clone.spec, clone.vocab_size = self.spec, self.vocab_size
        clone._matcher = self._matcher.deep_copy()
        return clone

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits into row `row` of an int32 [B, ceil(V/32)] CPU tensor."""
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar did not allow it (the matcher is then in error)."""
        return bool(self._matcher.consume_token(token_id))

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and allows nothing more (or an EOS was accepted)."""
        return bool(self._matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class GrammarCache:
    """Compiled grammars by spec (least recently used out): clients send one schema over and over, and a
    copy of a compiled matcher costs microseconds where compiling costs milliseconds to a second.
    Thread-safe; errors are not cached."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None, capacity: int = 64) -> None:
        self.tokenizer, self.vocab_size, self.capacity = tokenizer, vocab_size, capacity
        self._compiled: OrderedDict[str, GrammarMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher for `spec` (GrammarError if it does not compile). Slow on a miss: not on the event loop."""
        key = json.dumps([spec.kind, spec.value], sort_keys=True, ensure_ascii=False)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                self.hits += 1
                return compiled.copy()
        compiled = GrammarMatcher(spec, self.tokenizer, self.vocab_size)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return compiled.copy()


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


@functools.cache
def _byte_bias() -> torch.Tensor:
    """[256, 8] float: row b holds 0 where bit j of byte b is set, -inf where it is not."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, float("-inf"))


def token_bias(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Float [B, vocab_size]: 0 for allowed tokens, -inf for the rest, from packed int32 masks [B, ceil(V/32)]
    (bit j of word w = token 32w + j; little-endian bytes, as the masks are written)."""
    rows = bitmask.shape[0]
    by_byte = torch.nn.functional.embedding(bitmask.contiguous().view(torch.uint8).long(), _byte_bias())
    return by_byte.view(rows, -1)[:, :vocab_size]


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [B, vocab_size] from packed masks: which tokens the grammar allows (tests, diagnostics)."""
    return token_bias(bitmask, vocab_size) == 0


@dataclass
class TokenMask:
    """The grammar's verdict for some rows of a step: `bias[i]` (0 allowed, -inf not) belongs to row `rows[i]`."""

    rows: torch.Tensor  # long [k]
    bias: torch.Tensor  # float [k, V]


class BatchMasks:
    """The allowed tokens of a step's constrained rows, computed on a helper thread while the forward runs.

    `start(matchers)` is called before the forward (the masks depend only on tokens already accepted)
    and fills packed bitmasks in llguidance's Rust code, which releases the GIL; `allowed()` after the
    forward waits for it and unpacks the bits on the calling thread (torch ops stay on the engine
    thread, which owns the OpenMP pool). Unconstrained rows cost nothing.
    """

    def __init__(self, max_rows: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bitmask = new_bitmask(max_rows, vocab_size)
        self._pool: Any = None
        self._pending: Any = None
        self._rows: list[int] = []

    def start(self, matchers: Sequence[GrammarMatcher | None]) -> None:
        self._rows = [row for row, m in enumerate(matchers) if m is not None]
        for row in self._rows:
            if matchers[row].vocab_size != self.vocab_size:  # type: ignore[union-attr]
                raise ValueError(f"a grammar over {matchers[row].vocab_size} ids for logits of {self.vocab_size}")  # type: ignore[union-attr]
        if not self._rows:
            self._pending = None
            return
        if len(matchers) > self.bitmask.shape[0]:
            self.bitmask = new_bitmask(len(matchers), self.vocab_size)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaserve-grammar")
        work = [(row, matchers[row]) for row in self._rows]
        self._pending = self._pool.submit(self._fill, work)

    def _fill(self, work: list[tuple[int, Any]]) -> None:
        for row, matcher in work:
            matcher.fill_bitmask(self.bitmask, row)

    def mask(self, device: torch.device | str = "cpu") -> TokenMask | None:
        """The constrained rows' bias once their masks are in, or None when no row given to start() has a grammar."""
        if self._pending is None:
            return None
        self._pending.result()
        self._pending = None
        rows = torch.tensor(self._rows)
        bias = token_bias(self.bitmask[rows], self.vocab_size)
        return TokenMask(rows.to(device), bias.to(device))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
