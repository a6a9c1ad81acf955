"""bench/grammar_engines.py runs from a clean `.[bench]` install (llguidance only) and checks its own masks."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import grammar_engines


def test_the_mask_benchmark_walks_a_document_through_every_mask(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grammar_engines, "optional_xgrammar", lambda: None)  # measured only when installed
    assert grammar_engines.main(["--model", str(smollm2_path), "--batches", "1,2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("llguidance")]
    assert [(r[1], r[2]) for r in rows] == [
        ("json_schema", "1"),
        ("json_schema", "2"),
        ("json_object", "1"),
        ("json_object", "2"),
    ]
    assert all(r[-1] == "True" for r in rows), out  # every token of the document was allowed by its mask
    assert "vocabulary 49152" in out
