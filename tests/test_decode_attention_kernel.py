"""Our decode attention kernel (model/kernels/decode_attention.c via model/decode_attention.py): the plain
ops' attention to float32 rounding, over each row's own keys only, the same bits for a row whatever its
batch, the step's key length or the thread count, used by the model wherever it can run (float32 on an
AVX-512 CPU) and the plain ops kept, with the reason, everywhere else."""

from __future__ import annotations

import pytest
import torch

from model import decode_attention as attention
from model.decode_attention import decode_attention, native_decode_attention, self_check
from model.native import c_compiler, load_kernel
from tests.support.models import tiny_model

needs_native = pytest.mark.skipif(
    c_compiler() is None or native_decode_attention(4, 2, 64, torch.float32, "cpu")[0] is None,
    reason="no AVX-512 or no C compiler here: decode attention runs in plain ops",
)


def inputs(batch: int, heads: int, kv_heads: int, head_dim: int, length: int, seed: int, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator) * scale
    keys, values = (torch.randn(batch, kv_heads, length, head_dim, generator=generator) for _ in range(2))
    return q, keys, values


def plain(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    mask = (torch.arange(keys.shape[2])[None] <= positions)[:, None, None]
    return decode_attention(q, keys, values, mask)


@needs_native
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 16), (8, 2, 128), (32, 8, 128), (14, 2, 64)],  # SmolLM2, MHA, Llama-3-8B's group of 4, Qwen2's 7
)
def test_the_kernel_is_the_plain_ops_attention(heads: int, kv_heads: int, head_dim: int) -> None:
    operator, _ = native_decode_attention(heads, kv_heads, head_dim, torch.float32, "cpu")
    q, keys, values = inputs(6, heads, kv_heads, head_dim, 70, seed=heads)
    positions = torch.tensor([[0], [1], [15], [16], [17], [69]])  # one key, the 16-lane tails, the whole length
    torch.testing.assert_close(operator(q, keys, values, positions), plain(q, keys, values, positions), rtol=1e-5, atol=1e-6)


@needs_native
def test_peaked_softmaxes_stay_exact_enough() -> None:
    """Scores spread over tens of units (exp's range reduction at work), one key dominating."""
    operator, _ = native_decode_attention(4, 2, 64, torch.float32, "cpu")
    q, keys, values = inputs(3, 4, 2, 64, 300, seed=1, scale=6.0)
    positions = torch.tensor([[299], [200], [33]])
    torch.testing.assert_close(operator(q, keys, values, positions), plain(q, keys, values, positions), rtol=1e-4, atol=1e-5)


@needs_native
def test_a_rows_bits_do_not_depend_on_its_batch_its_key_length_or_the_threads() -> None:
    """Rows read as a window of a larger cache (the compiled step's in-place views), alone or together,
    with the step reading more keys than the row's own, and with other thread counts."""
    operator, _ = native_decode_attention(9, 3, 64, torch.float32, "cpu")
    cache_k, cache_v = (torch.randn(8, 3, 513, 64, generator=torch.Generator().manual_seed(s)) for s in (2, 3))
    q = torch.randn(8, 9, 1, 64, generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[5], [63], [64], [130], [255], [256], [300], [511]])
    together = operator(q, cache_k[:, :, :512], cache_v[:, :, :512], positions)
    for row in range(8):
        own = int(positions[row]) + 1
        for length in (own, own + 1, 512):
            alone = operator(
                q[row : row + 1], cache_k[row : row + 1, :, :length], cache_v[row : row + 1, :, :length], positions[row : row + 1]
            )
            assert torch.equal(alone, together[row : row + 1]), (row, length)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert torch.equal(operator(q, cache_k[:, :, :512], cache_v[:, :, :512], positions), together)
    finally:
        torch.set_num_threads(before)


@needs_native
def test_rows_that_pad_a_bucket_read_one_key_and_disturb_nobody() -> None:
    """The static step pads a batch with rows at the scratch position (>= the key length read)."""
    operator, _ = native_decode_attention(4, 2, 32, torch.float32, "cpu")
    q, keys, values = inputs(3, 4, 2, 32, 64, seed=5)
    positions = torch.tensor([[10], [64], [10_000]])
    out = operator(q, keys, values, positions)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:2], plain(q[1:2], keys[1:2, :, :1], values[1:2, :, :1], torch.tensor([[0]])))
    assert torch.equal(out[:1], operator(q[:1], keys[:1], values[:1], positions[:1]))


def test_plain_ops_stay_where_the_kernel_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native_decode_attention(4, 2, 64, torch.bfloat16, "cpu")[0] is None
    assert "multiple of 16" in native_decode_attention(4, 2, 40, torch.float32, "cpu")[1]
    monkeypatch.setenv(attention.KERNEL_ENV, "torch")
    assert native_decode_attention(4, 2, 64, torch.float32, "cpu") == (None, "plain ops ($LLAMASERVE_ATTENTION_KERNEL=torch)")
    assert tiny_model().decode_attention_kernel == "plain ops ($LLAMASERVE_ATTENTION_KERNEL=torch)"
    assert all(layer.attention.native_decode is None for layer in tiny_model().layers)
    monkeypatch.setenv(attention.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="auto or torch"):
        native_decode_attention(4, 2, 64, torch.float32, "cpu")


@needs_native
def test_a_float32_model_decodes_through_it() -> None:
    model = tiny_model()
    assert model.decode_attention_kernel.startswith("native kernel (")
    assert all(layer.attention.native_decode is not None for layer in model.layers)


@pytest.mark.skipif(c_compiler() is None, reason="no C compiler here")
def test_a_build_without_avx512_says_so_and_refuses_to_run() -> None:
    library = load_kernel("decode_attention", ("-march=native", "-mno-avx512f"))
    assert library.decode_attention_available() == 0


def test_the_load_time_check_refuses_a_batch_dependent_or_wrong_kernel() -> None:
    def row_by_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Invariant by construction, as the kernel: each row alone over exactly its own keys."""
        rows = []
        for row in range(q.shape[0]):
            own = int(positions[row]) + 1
            rows.append(
                plain(q[row : row + 1], keys[row : row + 1, :, :own], values[row : row + 1, :, :own], positions[row : row + 1])
            )
        return torch.cat(rows)

    assert self_check(row_by_row) is None
    assert "other bits in a batch" in str(self_check(lambda q, k, v, p: row_by_row(q, k, v, p) + 1e-6 * q.shape[0]))
    assert "off the plain ops" in str(self_check(lambda q, k, v, p: row_by_row(q, k, v, p) * 1.001))


@needs_native
def test_a_kernel_that_fails_its_check_is_refused_once_and_models_still_load() -> None:
    """In a fresh process: a failed load-time check leaves the plain ops, and the next model's set-up asks
    again without defining the operator a second time (torch.library refuses that) or raising."""
    import subprocess
    import sys

    from tests.support import REPO

    script = (
        "import torch\n"
        "from model import decode_attention as a, int4_gemm as g\n"
        "a.self_check = lambda op: 'refused for the test'\n"
        "g.self_check = lambda op: 'refused for the test'\n"
        "for _ in range(2):\n"
        "    print(a.native_decode_attention(9, 3, 64, torch.float32, 'cpu')[1])\n"
        "    print(g.native_gemm()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert (
        out.splitlines()
        == [
            "plain ops: no native kernel here (refused for the test)",
            "torch's kernel: no native one here (refused for the test)",
        ]
        * 2
    )
