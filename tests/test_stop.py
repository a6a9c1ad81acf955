"""StopMatcher: text is held back while it could start a stop string; no part of a stop is emitted."""

from __future__ import annotations

import itertools

import pytest

from app.stop import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(p) for p in pieces)
    if matcher.matched is None:
        out += matcher.flush()
    return out, matcher.matched


def reference(stops: list[str], text: str) -> tuple[str, str | None]:
    """Cut the whole text at the earliest occurrence of any stop string."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    pos, stop = min(hits)
    return text[:pos], stop


def test_stop_split_across_pieces_never_leaks() -> None:
    matcher = StopMatcher(["STOP"])
    emitted = [matcher.push(p) for p in ["hello S", "T", "O", "P tail"]]
    assert emitted == ["hello ", "", "", ""]
    assert matcher.matched == "STOP"
    assert matcher.flush() == ""


def test_false_start_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("a ST") == "a "
    assert matcher.push("x") == "STx"
    assert matcher.push("S") == ""
    assert matcher.flush() == "S"
    assert matcher.matched is None


def test_stop_at_start() -> None:
    assert run(["###"], ["###", "more"]) == ("", "###")
    assert run(["ab"], ["a", "b"]) == ("", "ab")


def test_multiple_stops_earliest_wins() -> None:
    assert run(["world", "lo"], ["hel", "lo wor", "ld"]) == ("hel", "lo")
    assert run(["\n\n", "END"], ["x END", "\n\n"]) == ("x ", "END")


def test_overlapping_and_prefix_stops() -> None:
    # "aab" overlaps itself: after "aa" a further "a" must keep holding the last "aa".
    assert run(["aab"], ["a", "a", "a", "b"]) == ("a", "aab")
    # One stop is a prefix of another: the shorter one matches first.
    assert run(["ab", "abc"], ["xa", "bc"]) == ("x", "ab")


def test_no_stops_passes_text_through_and_empty_stop_is_ignored() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.push("abc") == "abc"
    assert matcher.flush() == ""


@pytest.mark.parametrize("text", ["the cat sat on the mat. END here", "no stop at all", "ENEND", "EEND!", "E"])
def test_every_split_matches_the_whole_text_reference(text: str) -> None:
    stops = ["END", "mat.", "t s"]
    expected = reference(stops, text)
    # All splits of the text into 3 pieces.
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        pieces = [text[:i], text[i:j], text[j:]]
        assert run(stops, pieces) == expected, pieces


def test_nothing_after_a_match() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.push("ax") == "a"
    assert matcher.push("more") == ""
    assert matcher.flush() == ""
