"""Settings from env and flags, and the entry point's exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.cli import main, settings_from_args
from app.config import Settings
from tests.support import REPO


def test_flags_override_env_and_env_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMASERVE_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("LLAMASERVE_PORT", "9000")
    monkeypatch.setenv("LLAMASERVE_CORS_ORIGINS", "http://a, http://b")
    s = settings_from_args(["serve", "--max-batch-size", "5", "--no-warmup", "--chat-format", "llama3", "--api-key", "k"])
    assert (s.max_batch_size, s.port, s.warmup, s.chat_format, s.api_key) == (5, 9000, False, "llama3", "k")
    assert s.cors_origins == ["http://a", "http://b"]
    assert settings_from_args([]).host == "127.0.0.1"  # `python -m app` needs no subcommand


def test_cache_dir_comes_from_the_environment_or_the_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The server reads LLAMASERVE_CACHE_DIR through Settings only, and hands cache_dir to model/fetch and the loader."""
    monkeypatch.delenv("LLAMASERVE_CACHE_DIR", raising=False)
    assert Settings().cache_dir == Path.home() / ".cache" / "llamaserve"
    monkeypatch.setenv("LLAMASERVE_CACHE_DIR", str(tmp_path / "env"))
    assert Settings().cache_dir == tmp_path / "env"
    assert settings_from_args(["--cache-dir", str(tmp_path / "flag")]).cache_dir == tmp_path / "flag"
    monkeypatch.setenv("LLAMASERVE_CACHE_DIR", "")  # set but empty: the default, as before
    assert Settings().cache_dir == Path.home() / ".cache" / "llamaserve"


def test_device_and_dtype_auto() -> None:
    s = Settings()
    assert s.resolved_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert s.resolved_dtype() == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert Settings(device="cpu", dtype="bfloat16").resolved_dtype() == torch.bfloat16


def test_invalid_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--no-such-flag"])
    assert exc.value.code == 2


def test_missing_checkpoint_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "app", "--model", str(tmp_path / "nope.gguf"), "--port", "0", "--log-level", "warning"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nope.gguf" in result.stderr and "Traceback" not in result.stderr


def test_quantization_setting_reaches_the_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import model.checkpoint
    from app.lifecycle import load_checkpoint

    seen: dict[str, object] = {}

    def fake_load_model(path: str, **kwargs: object) -> object:
        seen.update(kwargs)
        raise model.checkpoint.CheckpointError("stop here")

    monkeypatch.setattr(model.checkpoint, "load_model", fake_load_model)
    monkeypatch.setenv("LLAMASERVE_QUANTIZATION", "none")
    assert settings_from_args([]).quantization == "none"
    assert settings_from_args(["serve", "--quantization", "int4"]).quantization == "int4"
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--quantization", "int8"])
    assert exc.value.code == 2
    with pytest.raises(model.checkpoint.CheckpointError):
        load_checkpoint(settings_from_args(["serve", "--model", str(tmp_path / "m.gguf"), "--quantization", "int4"]))
    assert seen["quantization"] == "int4"
    assert Settings().quantization == "none"  # from the environment set above
