"""bench/gpu_check.sh --dry-run: the GPU check's code paths on the CPU with tiny shapes, and its
comparisons broken on purpose (a check that cannot fail checks nothing). ~15 s on 2 cores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The shell script end to end (install step skipped: no wheels folder), as the device tool runs it."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(out / "no-wheels")}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)],
        cwd=out,  # the script finds the repo root itself
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    assert (out / "gpu_check.log").exists()
    return proc, report


def test_dry_run_passes_and_writes_every_section(dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    proc, report = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["passed"] is True and report["meta"]["dry_run"] is True
    assert set(report["tests"]) == set(gpu_check.TESTS)
    assert set(report["measurements"]) == set(gpu_check.MEASUREMENTS)
    for group in ("tests", "measurements"):
        for name, section in report[group].items():
            assert section["passed"] is True, (name, section)
            assert "error" not in section and section["elapsed_s"] >= 0
    assert "PASSED" in proc.stdout and "gpu_check.sh: exit 0" in proc.stdout


def test_dry_run_numbers_are_sensible(dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _, report = dry_run
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["copy_bandwidth_gb_s"] > 0.1

    compiled = report["tests"]["compiled_vs_eager"]
    assert "torch.compile" in compiled["compiled_with"] or "StaticStep" in compiled["compiled_with"]
    assert compiled["dynamo"]["unique_graphs"] >= 1  # dynamo really traced the model, no silent eager
    for part in ("prefill", "decode"):
        assert 0 <= compiled[part]["max_abs_diff"] <= compiled[part]["tolerance"]
    assert compiled["decode"]["steps"] == gpu_check.DRY.compile_steps

    batched = report["tests"]["batched_vs_single"]
    for mode in ("batch_invariant", "fast"):
        entry = batched[mode]
        assert entry["mismatches"] == [] and entry["largest_batch"] == len(gpu_check.DRY.batched_lengths)
        assert entry["tokens"] == len(gpu_check.DRY.batched_lengths) * gpu_check.DRY.batched_new

    fidelity = report["tests"]["bf16_fidelity"]
    for part in ("prefill", "decode"):
        r = fidelity[part]
        assert 0 < r["kl_mean"] < gpu_check.MAX_MEAN_KL  # > 0: the bf16 model really is bf16
        assert r["top1_decisive_pct"] >= gpu_check.MIN_TOP1_PCT and 0 < r["top1_pct"] <= 100

    decode = report["measurements"]["decode_8b"]
    assert decode["dtype"] == "bfloat16"
    embedding = gpu_check.TINY["vocab_size"] * gpu_check.TINY["dim"]  # untied: one row of it is read per token
    assert decode["weight_bytes_per_token"] == 2 * (decode["parameters"] - embedding)
    for mode in ("eager", "compiled"):
        r = decode[mode]
        assert r["tok_s"] > 0 and r["steps"] > 0
        assert isinstance(r["bandwidth_fraction"], float) and 0 < r["bandwidth_fraction"] < 10
        assert math.isclose(
            r["bandwidth_fraction"], decode["weight_bytes_per_token"] * r["tok_s"] / (env["copy_bandwidth_gb_s"] * 1e9)
        )
    assert isinstance(decode["meets_target"], bool)

    throughput = report["measurements"]["throughput"]
    assert throughput["timed_out"] is False and throughput["completed_requests"] == gpu_check.DRY.tp_requests
    assert throughput["output_tokens"] == throughput["output_tokens_asked"] > 0
    assert throughput["output_tok_s"] > 0 and throughput["prompt_tokens"] > 0


def test_weight_bytes_skip_only_an_untied_embedding_table() -> None:
    untied = gpu_check.build_model(gpu_check.TINY, torch.device("cpu"), torch.bfloat16, max_batch_size=1, max_seq_len=8)
    tied = gpu_check.build_model(gpu_check.TINY_QWEN, torch.device("cpu"), torch.bfloat16, max_batch_size=1, max_seq_len=8)
    embedding = gpu_check.TINY["vocab_size"] * gpu_check.TINY["dim"]
    assert gpu_check.weight_bytes_per_token(untied) == 2 * (sum(p.numel() for p in untied.parameters()) - embedding)
    assert gpu_check.weight_bytes_per_token(tied) == 2 * sum(p.numel() for p in tied.parameters())  # it is the head


def test_compare_logits_catches_a_difference() -> None:
    logits = torch.randn(4, 50) * 5
    assert gpu_check.compare_logits(logits, logits.clone())["passed"]
    assert gpu_check.compare_logits(logits, logits + 1e-5)["passed"]  # float32 reordering noise
    shifted = logits.clone()
    shifted[2, 7] += 1.0  # one logit off by one: a wrong position or stale cache looks like this, only worse
    broken = gpu_check.compare_logits(logits, shifted)
    assert not broken["passed"] and broken["max_abs_diff"] == pytest.approx(1.0)
    nan = logits.clone()
    nan[0, 0] = float("nan")
    assert not gpu_check.compare_logits(logits, nan)["passed"]
    assert not gpu_check.compare_logits(logits, logits[:2])["passed"]


def test_compare_tokens_catches_a_mismatch() -> None:
    same = gpu_check.compare_tokens([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])
    assert same["passed"] and same["tokens"] == 5
    broken = gpu_check.compare_tokens([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])
    assert not broken["passed"] and broken["mismatches"] == [{"prompt": 0, "first_difference": 2}]
    assert not gpu_check.compare_tokens([[1, 2]], [[1, 2, 3]])["passed"]  # a longer output differs too
    assert not gpu_check.compare_tokens([[]], [[]])["passed"]  # nothing generated proves nothing


def test_fidelity_verdict_catches_a_distorted_distribution() -> None:
    torch.manual_seed(0)
    reference = torch.randn(256, 100) * 4
    exact = gpu_check.distribution_metrics(reference, reference.clone())
    assert exact["kl_mean"] == pytest.approx(0, abs=1e-12) and exact["top1_pct"] == 100 and gpu_check.fidelity_verdict(exact)
    rounded = gpu_check.distribution_metrics(reference, reference.bfloat16().float())  # what bf16 output costs
    assert gpu_check.fidelity_verdict(rounded) and rounded["top1_decisive_pct"] == 100
    noisy = gpu_check.distribution_metrics(reference, reference + torch.randn(256, 100))  # a real bug's size
    assert noisy["kl_mean"] > gpu_check.MAX_MEAN_KL and not gpu_check.fidelity_verdict(noisy)
    permuted = gpu_check.distribution_metrics(reference, reference[:, torch.randperm(100)])
    assert permuted["top1_decisive_pct"] < 20 and not gpu_check.fidelity_verdict(permuted)
    # Top-1 flips alone fail it, even where the KL threshold would let them through.
    flips = reference.clone()
    top = flips.argmax(-1)
    flips[torch.arange(0, 256, 16), top[::16]] -= 0.5 + (reference.max(-1).values - reference.topk(2).values[:, 1])[::16]
    flipped = gpu_check.distribution_metrics(reference, flips)
    assert flipped["top1_decisive_pct"] < gpu_check.MIN_TOP1_PCT and not gpu_check.fidelity_verdict(flipped, max_mean_kl=1.0)


def test_exit_code_fails_on_any_failed_section() -> None:
    report: dict[str, Any] = {
        "environment": {"passed": True},
        "tests": {name: {"passed": True} for name in gpu_check.TESTS},
        "measurements": {name: {"passed": True} for name in gpu_check.MEASUREMENTS},
    }
    assert gpu_check.exit_code(report) == 0
    report["tests"]["batched_vs_single"] = {"passed": False, "error": "RuntimeError: boom"}
    assert gpu_check.exit_code(report) == 1
    report["tests"]["batched_vs_single"] = {"passed": True}
    report["measurements"]["throughput"] = {}
    assert gpu_check.exit_code(report) == 1
