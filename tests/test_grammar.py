"""model/grammar.py and the sampler's grammar mask: allowed tokens, end tokens, compile errors, the cache."""

from __future__ import annotations

import json

import pytest
import torch

from model.grammar import (
    BatchMasks,
    GrammarCache,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
    TokenMask,
    allowed_tokens,
    new_bitmask,
)
from model.sampling import Sampler, SamplingParams
from model.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()  # ids 0..255 are bytes; 256 <|bos|>, 257 <|eos|>, 258 <|eot|> (both stops)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def allowed_ids(matcher: GrammarMatcher, vocab_size: int = TOKENIZER.vocab_size) -> set[int]:
    bitmask = new_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return set(allowed_tokens(bitmask, vocab_size)[0].nonzero().flatten().tolist())


def test_allowed_tokens_unpacks_each_bit_to_its_token() -> None:
    vocab = 70  # not a multiple of 32: the last word's high bits are cut off
    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=generator)
    expected = torch.tensor([[bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for r in range(3)])
    assert torch.equal(allowed_tokens(bitmask, vocab), expected)


def test_a_json_schema_allows_a_valid_document_token_by_token_and_ends_it() -> None:
    matcher = GrammarMatcher(GrammarSpec("json_schema", SCHEMA), TOKENIZER)
    document = json.dumps({"name": "Ada", "age": 36}, separators=(", ", ": "))
    for byte in document.encode():
        allowed = allowed_ids(matcher)
        assert byte in allowed
        assert 257 not in allowed and 258 not in allowed, "no end token before the document is complete"
        assert matcher.accept(byte)
    assert matcher.is_stopped, "a closed top-level object allows nothing more"
    assert allowed_ids(matcher) <= {257, 258}


def test_a_token_outside_the_grammar_is_refused() -> None:
    matcher = GrammarMatcher(GrammarSpec("json_schema", SCHEMA), TOKENIZER)
    assert allowed_ids(matcher) == {ord("{")}
    assert not matcher.accept(ord("x"))
    assert matcher.error is not None


def test_end_tokens_are_allowed_exactly_when_the_grammar_accepts() -> None:
    matcher = GrammarMatcher(GrammarSpec("regex", "[0-9]{1,3}"), TOKENIZER)
    assert allowed_ids(matcher) == {ord(c) for c in "0123456789"}
    matcher.accept(ord("4"))
    assert allowed_ids(matcher) == {ord(c) for c in "0123456789"} | {257, 258}
    matcher.accept(ord("2"))
    matcher.accept(ord("7"))
    assert allowed_ids(matcher) == {257, 258}


def test_choices_and_gbnf_grammars() -> None:
    choice = GrammarMatcher(GrammarSpec("choice", ["yes", "no", 'say "hi"\n']), TOKENIZER)
    assert allowed_ids(choice) == {ord("y"), ord("n"), ord("s")}
    for byte in b'say "hi"\n':
        assert choice.accept(byte)
    assert choice.is_stopped
    gbnf = GrammarMatcher(GrammarSpec("grammar", 'root ::= "a" digit+\ndigit ::= [0-9]'), TOKENIZER)
    assert allowed_ids(gbnf) == {ord("a")}


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (GrammarSpec("json_schema", {"type": "nope"}), "nope"),
        (GrammarSpec("json_schema", {"type": "object", "if": {}}), "if"),
        (GrammarSpec("json_schema", {"type": "string", "format": "unheard-of"}), "unheard-of"),
        (GrammarSpec("json_schema", ["not", "a", "schema"]), "JSON object"),
        (GrammarSpec("regex", "[a-"), "regex"),
        (GrammarSpec("regex", ""), "non-empty"),
        (GrammarSpec("choice", []), "non-empty list"),
        (GrammarSpec("choice", ["ok", 3]), "non-empty list"),
        (GrammarSpec("grammar", "start: undefined_rule"), "undefined_rule"),
        (GrammarSpec("grammar", "root ::= ("), "grammar"),
    ],
)
def test_a_bad_grammar_is_a_grammar_error_that_names_the_problem(spec: GrammarSpec, words: str) -> None:
    with pytest.raises(GrammarError, match=words):
        GrammarMatcher(spec, TOKENIZER)


def test_copies_advance_independently() -> None:
    first = GrammarMatcher(GrammarSpec("choice", ["ab", "cd"]), TOKENIZER)
    second = first.copy()
    first.accept(ord("a"))
    assert allowed_ids(first) == {ord("b")}
    assert allowed_ids(second) == {ord("a"), ord("c")}


def test_the_cache_compiles_once_and_hands_out_fresh_matchers() -> None:
    cache = GrammarCache(TOKENIZER)
    spec = GrammarSpec("json_schema", SCHEMA)
    first = cache.matcher(spec)
    first.accept(ord("{"))
    second = cache.matcher(GrammarSpec("json_schema", json.loads(json.dumps(SCHEMA))))
    assert cache.hits == 1
    assert allowed_ids(second) == {ord("{")}, "a cached grammar starts from the beginning"
    with pytest.raises(GrammarError):
        cache.matcher(GrammarSpec("regex", "("))


def test_a_model_vocabulary_larger_than_the_tokenizer_never_allows_the_extra_ids() -> None:
    matcher = GrammarMatcher(GrammarSpec("regex", "[0-9]+"), TOKENIZER, vocab_size=300)
    matcher.accept(ord("1"))
    allowed = allowed_ids(matcher, 300)
    assert allowed == {ord(c) for c in "0123456789"} | {257, 258}


def test_batch_masks_leave_unconstrained_rows_alone() -> None:
    masks = BatchMasks(max_rows=2, vocab_size=TOKENIZER.vocab_size)
    digits = GrammarMatcher(GrammarSpec("regex", "[0-9]"), TOKENIZER)
    masks.start([None, digits, None])  # more rows than it was sized for
    mask = masks.mask()
    assert mask is not None and mask.rows.tolist() == [1] and mask.bias.shape == (1, TOKENIZER.vocab_size)
    assert set((mask.bias[0] == 0).nonzero().flatten().tolist()) == {ord(c) for c in "0123456789"}
    assert set(mask.bias[0].unique().tolist()) == {0.0, float("-inf")}
    masks.start([None, None])
    assert masks.mask() is None
    masks.close()


def as_mask(allowed: torch.Tensor, rows: list[int] | None = None) -> TokenMask:
    rows = rows if rows is not None else list(range(allowed.shape[0]))
    return TokenMask(torch.tensor(rows), torch.where(allowed[rows], 0.0, float("-inf")))


def test_the_sampler_leaves_rows_outside_the_mask_alone() -> None:
    vocab = TOKENIZER.vocab_size
    sampler = Sampler(3, vocab, seed=0)
    for slot in range(3):
        sampler.set_slot(slot, SamplingParams(temperature=0), [1])
    logits = _logits(3, vocab)
    allowed = torch.zeros(3, vocab, dtype=torch.bool)
    allowed[1, 7] = True
    out = sampler.sample(logits, [0, 1, 2], mask=as_mask(allowed, [1]))
    assert out.token_ids == [int(logits[0].argmax()), 7, int(logits[2].argmax())]


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_the_sampler_picks_only_allowed_tokens_greedy_and_sampled() -> None:
    vocab = TOKENIZER.vocab_size
    sampler = Sampler(2, vocab, seed=0)
    sampler.set_slot(0, SamplingParams(temperature=0), [1])
    sampler.set_slot(1, SamplingParams(temperature=1.5, top_p=0.9), [1])
    allowed = torch.zeros(2, vocab, dtype=torch.bool)
    allowed[:, [10, 20, 30]] = True
    for seed in range(50):
        logits = _logits(2, vocab, seed)
        out = sampler.sample(logits, [0, 1], mask=as_mask(allowed))
        assert out.token_ids[0] == max((10, 20, 30), key=lambda t: logits[0, t].item())
        assert out.token_ids[1] in (10, 20, 30)


def test_min_tokens_yields_to_a_grammar_that_allows_only_an_end() -> None:
    vocab = TOKENIZER.vocab_size
    sampler = Sampler(2, vocab, seed=0)
    for slot in (0, 1):
        sampler.set_slot(slot, SamplingParams(temperature=0), [1], suppress_ids=[257, 258])
    allowed = torch.zeros(2, vocab, dtype=torch.bool)
    allowed[0, [257, 258]] = True  # the grammar is complete: only an end token
    allowed[1, [5, 257]] = True  # the grammar could go on: min_tokens bans the end
    logits = _logits(2, vocab)
    logits[1, 257] = 100.0
    out = sampler.sample(logits, [0, 1], suppress=[True, True], mask=as_mask(allowed))
    assert out.token_ids[0] in (257, 258)
    assert out.token_ids[1] == 5
