"""Tokenizers against independent oracles: HF `tokenizers`, tiktoken itself, sentencepiece itself."""

from __future__ import annotations

import base64
import collections
import io
import json
from pathlib import Path

import gguf
import pytest
import regex
import sentencepiece as spm
import tiktoken
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from model.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    IncrementalDetokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    tokenizer_from_dir,
    tokenizer_from_gguf,
)
from tests.support.oracle import GOLDEN_PROMPT
from tests.support.tokenizer_corpus import corpus, training_text

# Patterns written out here (not imported) so the tests check the module's copies.
META_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
STREAM_TEXT = "Grüße, 世界! 🎉👨‍👩‍👧 naïve café ½ — done 42"
STREAM_TRAINED = "naïve café 你好世界 こんにちは straße über 42"  # only characters of training_text()


def stream(tokenizer, ids: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids] + [detok.flush()]


# ---- SmolLM2 from the real GGUF vs an HF reference built from the same vocab + merges ---------------


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_reader: gguf.GGUFReader) -> BPETokenizer:
    tok = tokenizer_from_gguf(smollm2_reader)
    assert isinstance(tok, BPETokenizer)
    return tok


def hf_from_gguf(reader: gguf.GGUFReader, pre_tokenizer, *, specials: bool) -> HFTokenizer:  # type: ignore[no-untyped-def]
    """HF reference from GGUF vocab + merges (as default-model.md: not transformers' GGUF loader)."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    if specials:
        hf.add_special_tokens([t for t, k in zip(tokens, types) if k == 3])
    return hf


SMOLLM_PRE = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
)


def test_smollm2_metadata(smollm2: BPETokenizer) -> None:
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id) == (49152, 1, 2)
    assert {2, 0} <= smollm2.stop_ids and 1 not in smollm2.stop_ids
    assert smollm2.special_tokens["<|im_start|>"] == 1 and smollm2.special_tokens["<|im_end|>"] == 2
    assert smollm2.token_bytes(1) == b"" and smollm2.token_bytes(17) == b"!"


def test_smollm2_matches_hf_reference(smollm2: BPETokenizer, smollm2_reader: gguf.GGUFReader) -> None:
    texts = corpus(2400)
    assert len(texts) >= 2000
    plain = hf_from_gguf(smollm2_reader, SMOLLM_PRE, specials=False)
    with_specials = hf_from_gguf(smollm2_reader, SMOLLM_PRE, specials=True)
    want_plain = [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]
    want_special = [e.ids for e in with_specials.encode_batch(texts, add_special_tokens=False)]
    bad_plain = [t for t, w in zip(texts, want_plain) if smollm2.encode(t) != w]
    bad_special = [t for t, w in zip(texts, want_special) if smollm2.encode(t, allow_special=True) != w]
    assert bad_plain == [] and bad_special == []
    # the corpus really exercises the hard cases
    assert sum("\x04" in t or "\U00040000" in t for t in texts) > 50
    assert sum(1 in w for w in want_special) > 50


def test_smollm2_golden_chat_prompt(smollm2: BPETokenizer) -> None:
    # ids from default-model.md (they reproduce transformers' / llama.cpp's output)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert smollm2.encode(prompt, allow_special=True) == GOLDEN_PROMPT
    assert smollm2.encode("x", bos=True)[0] == 1


def test_smollm2_decode_round_trip(smollm2: BPETokenizer, smollm2_reader: gguf.GGUFReader) -> None:
    hf = hf_from_gguf(smollm2_reader, SMOLLM_PRE, specials=True)
    texts = corpus(600, seed=99, missing=False)
    for text in texts:
        ids = smollm2.encode(text)
        assert smollm2.decode(ids) == text
    for text in corpus(300, seed=5):  # missing bytes are dropped, control tokens render as nothing
        ids = smollm2.encode(text, allow_special=True)
        assert smollm2.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_smollm2_special_text_is_plain_unless_allowed(smollm2: BPETokenizer) -> None:
    assert 1 not in smollm2.encode("<|im_start|>")
    assert smollm2.decode(smollm2.encode("<|im_start|>")) == "<|im_start|>"
    assert smollm2.encode("<|im_start|>", allow_special=True) == [1]


def test_smollm2_streaming(smollm2: BPETokenizer) -> None:
    ids = smollm2.encode(STREAM_TEXT)
    chunks = stream(smollm2, ids)
    assert "".join(chunks) == smollm2.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in c for c in chunks)
    assert any(c == "" for c in chunks)  # some character really was split across tokens


def test_bad_input_gives_clear_errors(smollm2: BPETokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        smollm2.decode([5, 49152])
    with pytest.raises(ValueError, match="out of range"):
        smollm2.token_bytes(-1)
    with pytest.raises(TypeError):
        smollm2.encode(b"bytes")  # type: ignore[arg-type]
    assert smollm2.decode(smollm2.encode("a\ud800b")) == "a\ufffdb"  # lone surrogate, no crash


def test_smollm2_as_tokenizer_json(smollm2_reader: gguf.GGUFReader, tmp_path: Path) -> None:
    """The same 49k vocabulary through the HF tokenizer.json loader (SmolLM2's original format)."""
    hf = hf_from_gguf(smollm2_reader, SMOLLM_PRE, specials=True)
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizer_from_dir(tmp_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, getattr(tok, "pad_id", None)) == (49152, 1, 2, 0)
    assert getattr(tokenizer_from_gguf(smollm2_reader), "pad_id", None) == 2  # the GGUF's padding_token_id
    texts = corpus(500, seed=77)
    want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert [t for t, w in zip(texts, want) if tok.encode(t, allow_special=True) != w] == []


def test_smollm2_build_is_fast(smollm2_reader: gguf.GGUFReader) -> None:
    import time

    start = time.perf_counter()
    tokenizer_from_gguf(smollm2_reader)
    assert time.perf_counter() - start < 1.0


# ---- Llama 3 tokenizer.model (tiktoken ranks) -------------------------------------------------------


def train_byte_bpe(texts: list[str], n_merges: int) -> dict[bytes, int]:
    """A naive byte-level BPE trainer: ranks for all 256 bytes, then the most frequent pairs in order."""
    words = collections.Counter(
        tuple(bytes([b]) for b in w.encode()) for t in texts for w in regex.findall(META_LLAMA3_PATTERN, t)
    )
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        candidates = [p for p, _ in pairs.most_common() if p[0] + p[1] not in ranks]
        if not candidates:
            break
        a, b = candidates[0]
        ranks[a + b] = len(ranks)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return ranks


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, int]]:
    ranks = train_byte_bpe(training_text(lines=150), 120)
    path = tmp_path_factory.mktemp("llama3")
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    (path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return path, ranks


def test_llama3_tiktoken_file(llama3_dir: tuple[Path, dict[bytes, int]]) -> None:
    path, ranks = llama3_dir
    tok = tokenizer_from_dir(path)
    base = len(ranks)
    named = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|eom_id|>": 8,
        "<|eot_id|>": 9,
    }
    for text, offset in named.items():
        assert tok.special_tokens[text] == base + offset
    assert tok.vocab_size == base + 256 and len(tok.special_tokens) == 256
    assert (tok.bos_id, tok.eos_id) == (base, base + 1)
    assert tok.stop_ids == {base + 1, base + 8, base + 9}
    specials = {t: base + o for t, o in named.items()}
    ref = tiktoken.Encoding("ref", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    texts = corpus(500, seed=3) + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]
    for text in texts:
        assert tok.encode(text) == ref.encode_ordinary(text)
        assert tok.encode(text, allow_special=True) == ref.encode(text, allowed_special=set(specials), disallowed_special=())
    assert tok.encode("<|eot_id|>") != [base + 9] and tok.encode("<|eot_id|>", allow_special=True) == [base + 9]
    ids = tok.encode(STREAM_TEXT)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == STREAM_TEXT and not any("\ufffd" in c for c in chunks)


def test_tiktoken_file_errors(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(TokenizerError, match="gaps"):
        tokenizer_from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        tokenizer_from_dir(tmp_path / "nothing-here")


# ---- HF tokenizer.json: trained byte-level BPEs with each supported pre-tokenizer -------------------


def byte_level(use_regex: bool) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


HF_CONFIGS = {
    # name: (pre-tokenizer, normalizer, full byte alphabet, unk token)
    "gpt2": (byte_level(True), None, True, None),
    "smollm": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level(True)]), None, False, None),
    "llama3": (
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(META_LLAMA3_PATTERN), "isolated"), byte_level(False)]),
        None,
        True,
        None,
    ),
    "qwen2": (
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level(False)]),
        normalizers.NFC(),
        True,
        None,
    ),
    "gpt2-unk": (byte_level(True), None, False, "<unk>"),
}


def train_hf(name: str) -> HFTokenizer:
    pre, normalizer, full_alphabet, unk = HF_CONFIGS[name]
    hf = HFTokenizer(models.BPE(unk_token=unk, fuse_unk=unk is not None))
    hf.pre_tokenizer = pre
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + ([unk] if unk else [])
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [],
        show_progress=False,
    )
    hf.train_from_iterator(training_text(), trainer=trainer)
    hf.add_tokens(["<tool>"])  # a non-special added token: always matched, rendered as text
    return hf


def save_hf(hf: HFTokenizer, path: Path, config: dict | None = None) -> Path:  # type: ignore[type-arg]
    path.mkdir(parents=True, exist_ok=True)
    hf.save(str(path / "tokenizer.json"))
    config = config or {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_tokenizer_json_matches_tokenizers(name: str, tmp_path: Path) -> None:
    hf = train_hf(name)
    tok = tokenizer_from_dir(save_hf(hf, tmp_path))
    assert (tok.bos_id, tok.eos_id) == (hf.token_to_id("<|im_start|>"), hf.token_to_id("<|im_end|>"))
    texts = corpus(800, seed=11) + ["x<tool>y", "<tool><|im_end|>", "ｆｕｌｌ　ｗｉｄｔｈ", "e\u0301 vs é"]
    want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert [t for t, w in zip(texts, want) if tok.encode(t, allow_special=True) != w] == []
    tool = hf.token_to_id("<tool>")
    assert tok.encode("a<tool>", allow_special=False)[-1] == tool and tok.decode([tool]) == "<tool>"
    clean = corpus(200, seed=12, specials=False, missing=False)
    assert [t for t in clean if tok.encode(t) != hf.encode(t, add_special_tokens=False).ids] == []
    assert [t for t in clean if tok.decode(tok.encode(t)) != hf.decode(hf.encode(t, add_special_tokens=False).ids)] == []
    ids = tok.encode(STREAM_TRAINED)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == STREAM_TRAINED and not any("\ufffd" in c for c in chunks)
    assert any(c == "" for c in chunks)


def test_hf_ids_not_in_merge_order(tmp_path: Path) -> None:
    """Ids unrelated to merge order (ids reversed): tiktoken ranks must be remapped, not taken as ids."""
    data = json.loads(train_hf("gpt2").to_str())
    vocab = data["model"]["vocab"]
    n = len(vocab)
    data["model"]["vocab"] = {t: (n + 2 - i if i >= 3 else i) for t, i in vocab.items()}  # 3..n-1 reversed
    hf = HFTokenizer.from_str(json.dumps(data))
    tok = tokenizer_from_dir(save_hf(hf, tmp_path))
    assert isinstance(tok, BPETokenizer) and tok._rank_to_id is not None
    texts = corpus(400, seed=13)
    want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert [t for t, w in zip(texts, want) if tok.encode(t, allow_special=True) != w] == []


@pytest.mark.parametrize(
    ("pre", "normalizer", "message"),
    [
        (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False), byte_level(True)]), None, "pre-tokenizer"),
        (pre_tokenizers.ByteLevel(add_prefix_space=True), None, "pre-tokenizer"),
        (byte_level(True), normalizers.NFKC(), "normalizer"),
    ],
)
def test_hf_unsupported_configs_are_refused(pre, normalizer, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hf = train_hf("gpt2")
    hf.pre_tokenizer = pre
    if normalizer is not None:
        hf.normalizer = normalizer
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_dir(save_hf(hf, tmp_path))


def test_hf_generation_config_adds_stops(tmp_path: Path) -> None:
    path = save_hf(train_hf("gpt2"), tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert tokenizer_from_dir(path).stop_ids == {0, 2}


# ---- GGUF with other pre-tokenizer types (written by gguf's own writer) ------------------------------


def write_gguf(hf: HFTokenizer, path: Path, pre: str) -> gguf.GGUFReader:
    data = json.loads(hf.to_str())
    vocab = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


@pytest.mark.parametrize(("pre", "config"), [("gpt2", "gpt2"), ("llama-bpe", "llama3"), ("qwen2", "qwen2"), ("smollm", "smollm")])
def test_gguf_pre_tokenizers(pre: str, config: str, tmp_path: Path) -> None:
    hf = train_hf(config)
    tok = tokenizer_from_gguf(write_gguf(hf, tmp_path / "t.gguf", pre))
    texts = corpus(500, seed=21, specials=False)
    want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert [t for t, w in zip(texts, want) if tok.encode(t) != w] == []
    assert tok.encode("<|im_end|>", allow_special=True) == [2] and tok.stop_ids >= {2}


def test_gguf_unknown_pre_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="'falcon' is not supported"):
        tokenizer_from_gguf(write_gguf(train_hf("gpt2"), tmp_path / "t.gguf", "falcon"))


# ---- SentencePiece ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text(lines=300)),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",  # as Llama 2
        remove_extra_whitespaces=False,
        user_defined_symbols=["<tool>"],
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def test_sentencepiece_matches_sentencepiece(sp_model: Path) -> None:
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = tokenizer_from_dir(sp_model.parent)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400) and tok.stop_ids == {2}
    texts = corpus(800, seed=31)
    assert [t for t in texts if tok.encode(t) != ref.encode(t)] == []
    assert tok.encode("hi", bos=True) == [1] + ref.encode("hi")
    assert tok.encode("<s>hi", allow_special=True) == [1] + ref.encode("hi")
    assert 1 not in tok.encode("<s>hi")
    clean = corpus(200, seed=32, specials=False, missing=False)
    assert [t for t in clean if tok.decode(ref.encode(t)) != ref.decode(ref.encode(t))] == []


def test_sentencepiece_streaming_bytes_and_spaces(sp_model: Path) -> None:
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = tokenizer_from_dir(sp_model.parent)
    ids = tok.encode(STREAM_TEXT)
    assert any(ref.is_byte(i) for i in ids)  # emoji / CJK fall back to byte pieces
    chunks = stream(tok, ids)
    assert not any("\ufffd" in c for c in chunks)
    # streaming is a continuation: it keeps the space "▁" stands for in front of the first word,
    # which sentencepiece's decode (a whole text) drops as the dummy prefix
    assert "".join(chunks) == " " + tok.decode(ids) and tok.decode(ids) == STREAM_TEXT
    word = tok.encode("the fox")
    assert "".join(stream(tok, word[1:])).startswith(" ")


def test_sentencepiece_from_gguf(sp_model: Path, tmp_path: Path) -> None:
    """A GGUF `llama` vocabulary (pieces, scores, types as llama.cpp writes them) == the original model."""
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = ref.get_piece_size()
    kinds = [2 if ref.is_unknown(i) else 3 if ref.is_control(i) else 6 if ref.is_byte(i) else 1 for i in range(n)]
    kinds[ref.piece_to_id("<tool>")] = 4
    writer = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([ref.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([ref.get_score(i) for i in range(n)])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_bool("tokenizer.ggml.add_space_prefix", True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = tokenizer_from_gguf(gguf.GGUFReader(tmp_path / "sp.gguf"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, n)
    texts = corpus(800, seed=33) + ["a<tool>b"]
    assert [t for t in texts if tok.encode(t) != ref.encode(t)] == []
    ids = ref.encode(STREAM_TEXT)
    assert tok.decode(ids) == ref.decode(ids) == STREAM_TEXT


# ---- the protocol's shared behaviour -----------------------------------------------------------------


def test_byte_tokenizer_still_works(byte_tokenizer: ByteTokenizer) -> None:
    assert byte_tokenizer.encode("<|eos|>", allow_special=True) == [257]
    assert byte_tokenizer.encode("<|eos|>") == list(b"<|eos|>")
    chunks = stream(byte_tokenizer, byte_tokenizer.encode(STREAM_TEXT))
    assert "".join(chunks) == STREAM_TEXT and not any("\ufffd" in c for c in chunks)
