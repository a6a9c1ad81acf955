"""One OpenMP wait policy, set by each entry point's main() before torch loads (model/threads.py), never at import."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import threads
from tests.support import REPO

KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
ENTRY_MODULES = ["app.cli", "app.config", "model.generate", "model.fetch", "bench.step_profile", "bench.engine_throughput"]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter (torch not loaded yet) with neither knob set unless given."""
    clean = {k: v for k, v in os.environ.items() if k not in KNOBS and k != "OMP_DISPLAY_ENV"}
    clean["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def libgomp_spincount(stderr: str) -> str | None:
    """GOMP_SPINCOUNT as libgomp read it at load (OMP_DISPLAY_ENV=verbose output)."""
    match = re.search(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    if "OPENMP DISPLAY ENVIRONMENT" not in stderr:
        pytest.skip("torch's OpenMP runtime is not libgomp")
    return match.group(1) if match else None


def test_importing_the_entry_points_changes_no_environment_and_loads_no_torch() -> None:
    code = (
        "import importlib, os, sys\n"
        "before = dict(os.environ)\n"
        f"for name in {ENTRY_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "assert 'torch' not in sys.modules, 'torch imported at import time'\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_configure_threads_before_torch_sets_the_spin_that_libgomp_reads() -> None:
    code = "from model.threads import configure_threads; configure_threads(1); import torch; print(torch.get_num_threads())"
    result = run_python(code, OMP_DISPLAY_ENV="verbose")
    assert result.returncode == 0, result.stderr
    assert libgomp_spincount(result.stderr) == threads.SPIN_COUNT
    assert result.stdout.split()[-1] == "1"


@pytest.mark.parametrize(("knob", "value"), [("GOMP_SPINCOUNT", "12345"), ("OMP_WAIT_POLICY", "PASSIVE")])
def test_a_policy_set_by_the_user_wins(knob: str, value: str) -> None:
    code = "import os; from model.threads import configure_threads; configure_threads(); print(os.environ.get('GOMP_SPINCOUNT'))"
    result = run_python(code, **{knob: value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (value if knob == "GOMP_SPINCOUNT" else "None")


@pytest.mark.parametrize(
    ("module", "argv", "exit_code"),
    [("app.cli", ["--port", "0", "--log-level", "warning"], 1), ("model.generate", ["--prompt", "x"], 2)],
)
def test_the_entry_points_apply_the_policy_before_torch_loads(
    tmp_path: Path, module: str, argv: list[str], exit_code: int
) -> None:
    """The server and the offline CLI (their modules are imported before main() runs) get the spin."""
    argv = ["--model", str(tmp_path / "none.gguf"), *argv]  # fails once torch is loaded, after the policy is set
    code = f"import sys; from {module} import main; sys.exit(main({argv!r}))"
    result = run_python(code, OMP_DISPLAY_ENV="verbose")
    assert result.returncode == exit_code and "none.gguf" in result.stderr
    assert libgomp_spincount(result.stderr) == threads.SPIN_COUNT


def test_after_torch_is_imported_only_the_thread_count_applies(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for knob in KNOBS:
        monkeypatch.delenv(knob, raising=False)
    saved = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger=threads.__name__):
            threads.configure_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
    assert "torch was imported before configure_threads()" in caplog.text
    assert not any(knob in os.environ for knob in KNOBS)  # the environment does not claim a policy that is not in force
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    caplog.clear()
    threads.configure_threads()
    assert caplog.text == ""  # the user's choice: nothing to warn about


def test_the_server_bounds_native_caches_before_torch_loads_also_with_a_thread_count(tmp_path: Path) -> None:
    """--threads makes configure_threads import torch; the oneDNN cache bound must be in the environment first."""
    argv = ["--model", str(tmp_path / "none.gguf"), "--port", "0", "--threads", "1", "--log-level", "warning"]
    code = f"import sys; from app.cli import main; sys.exit(main({argv!r}))"
    result = run_python(code)
    assert result.returncode == 1 and "none.gguf" in result.stderr
    assert "torch was imported before configure_memory()" not in result.stderr
