"""Helpers shared by the test modules (no tests here; pytest fixtures stay in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
