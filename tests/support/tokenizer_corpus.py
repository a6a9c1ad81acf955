"""A deterministic corpus of awkward strings for tokenizer tests (no files, no network).

Covers what breaks byte-level BPE ports: whitespace runs before digits, digit runs, contractions in
any case, code indentation, CJK / Arabic / Devanagari / emoji (ZWJ, skin tones), combining marks,
control characters (incl. the 21 bytes SmolLM2 has no token for), plane-4..11 code points (lead
bytes 0xF1/0xF2), lone surrogates, and special-token text.
"""

from __future__ import annotations

import random

WORDS = (
    "the quick brown fox jumps over lazy dog I you we they it's don't I'll we're they've she'd "
    "DON'T WE'LL It'S Hello World tokenizer server café naïve résumé straße über Ärger "
    "international1 x86_64 UTF-8 e.g. i.e. O'Neil rock'n'roll co-op a b c"
).split()
SCRIPTS = (
    "你好世界",
    "東京都",
    "한국어",
    "こんにちは",
    "مرحبا بالعالم",
    "שלום",
    "नमस्ते दुनिया",
    "Привет мир",
    "Ελληνικά",
    "ไทย",
    "🎉",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "❤️",
    "e\u0301",
    "n\u0303",
    "Å",
    "ﬁ",
    "①",
    "½",
    "²",
    "٣",
    "七",
)
CODE = (
    "def f(x):\n    return x + 1\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "if __name__ == '__main__':\n        main()\n",
    "const s = `${a}+${b}`;  // comment\n",
    "SELECT * FROM t WHERE id=42;\r\n",
    "    \n\n    x = [1, 2, 3]\n",
    '<div class="a">&nbsp;</div>',
    'print("hi")\t# tab\n',
)
SPECIAL_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<|eot_id|>", "<s>", "</s>", "<|im_start")
# The 21 bytes with no SmolLM2 token: ASCII controls and the lead bytes of planes 4..11 (0xF1, 0xF2).
MISSING_CHARS = ("\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", "\U00040000", "\U0007ffff", "\U00080001", "\U000bfffd")
CONTROL = tuple(chr(c) for c in (*range(0, 32), 0x7F, 0x80, 0x85, 0x9F, 0xA0, 0xAD, 0x200B, 0x2028, 0xFEFF))
WHITESPACE = (" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u3000", "\u00a0")


def _number(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 12)))
    if kind == 1:
        return f"{rng.random() * 10 ** rng.randrange(5):.{rng.randrange(4)}f}"
    if kind == 2:
        return f"{rng.randrange(1000)},{rng.randrange(1000):03d}"
    return "".join(rng.choice("0123456789٠١٢३") for _ in range(rng.randrange(1, 8)))


def _piece(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind < 3:
        return rng.choice(WORDS)
    if kind == 3:
        return rng.choice(SCRIPTS)
    if kind == 4:
        return rng.choice(WHITESPACE) + _number(rng)
    if kind == 5:
        return rng.choice(CODE)
    if kind == 6:
        return rng.choice(CONTROL + MISSING_CHARS)
    if kind == 7:
        return rng.choice(SPECIAL_TEXT)
    if kind == 8:
        return rng.choice(".,;:!?()[]{}<>'\"-_/\\@#$%^&*+=~`|…—«»")
    return rng.choice(WHITESPACE)


def corpus(n: int = 2200, seed: int = 1234, *, specials: bool = True, missing: bool = True) -> list[str]:
    """n strings: fixed edge cases first, then random mixes of the pieces above."""
    rng = random.Random(seed)
    fixed = [
        "",
        " ",
        "  1",
        "\n\n42",
        "   123456",
        "a  1",
        "x\t\t7",
        "1 2  3   4",
        "Hello, world!",
        "I'M HERE",
        "'s 'S 'll",
        "2024-11-25T08:40:00Z",
        "3.14159",
        " \n\n\n",
        "  hello",
        "hello  ",
        "a\u0301b",
        "🎉🎉🎉",
        "".join(MISSING_CHARS),
        "a\x04b",
        "\x04\x04x",
        " \U00040000",
        "x\U000bfffdy",
    ]
    if specials:
        fixed += ["<|im_start|>user\nhi<|im_end|>\n", "x<|im_end|>y", "<|im_start|><|im_start|>", "<|im_end"]
    out = list(fixed)
    while len(out) < n:
        out.append("".join(_piece(rng) + rng.choice(("", " ", " ", "")) for _ in range(rng.randrange(1, 12))))
    if not specials:
        out = [_strip(s, SPECIAL_TEXT) for s in out]
    if not missing:
        out = [_strip(s, MISSING_CHARS) for s in out]
    return out


def _strip(text: str, pieces: tuple[str, ...]) -> str:
    for p in pieces:
        text = text.replace(p, "")
    return text


def training_text(seed: int = 7, lines: int = 400) -> list[str]:
    """Text to train tiny tokenizers on (no missing-byte chars, so they stay rare for the vocab)."""
    rng = random.Random(seed)
    pieces = [*WORDS, *SCRIPTS[:6], *CODE]
    return [" ".join(rng.choice(pieces) for _ in range(rng.randrange(3, 15))) + " " + _number(rng) for _ in range(lines)]
