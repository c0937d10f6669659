"""Triton dequant-matmul vs the dequantize-then-matmul reference (interpreter on CPU, CUDA on a GPU)."""

import pytest
import torch

import flashquant as fq
from determinism import assert_same_bits_across_calls_and_graph_replays
from tolerances import assert_qmm_close

pytest.importorskip("triton")
if not fq.backends()["triton"].available:
    pytest.skip("triton backend unavailable: " + fq.backends()["triton"].reason, allow_module_level=True)

from flashquant.kernels import quant_matmul as qmm_module  # noqa: E402
from flashquant.kernels.dequantize import dequantize_triton  # noqa: E402
from flashquant.kernels.quant_matmul import DEQUANT_GEMM_MIN_M, quant_matmul_triton  # noqa: E402
from flashquant.quant import unpack  # noqa: E402
from flashquant.reference.quant import dequantize_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_quant_matmul_triton_matches_reference(dtype, bits, group_size, symmetric, m):
    n, k = 67, 512 if group_size != -1 else 200  # odd N; K not a multiple of the K tile for per-channel
    w = torch.randn(n, k, device=DEVICE).to(dtype)
    qw = fq.quantize(w, bits, group_size, symmetric)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    ref = fq.quant_matmul(x, qw, bias, backend="reference")
    out = fq.quant_matmul(x, qw, bias, backend="triton")
    assert out.dtype == dtype and out.shape == (m, n)
    assert_qmm_close(out, ref, f"bits={bits} g={group_size} sym={symmetric} m={m}")


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_split_k_partials_are_reduced_exactly_once(split_k):
    dtype = DTYPES[0]
    w = torch.randn(40, 640, device=DEVICE).to(dtype)
    qw = fq.quantize(w, 4, 64, symmetric=False)
    x = torch.randn(2, 640, device=DEVICE).to(dtype)
    out = quant_matmul_triton(x, qw.qdata, qw.scales, qw.zeros, 4, 64, split_k=split_k)
    assert_qmm_close(out, fq.quant_matmul(x, qw, backend="reference"), f"split_k={split_k}")


@pytest.mark.parametrize("bits, group_size", [(4, 128), (8, -1)])
def test_split_k_sum_in_the_kernel_is_deterministic(bits, group_size):
    """split_k = 8 over K = 4096 (N = 40: one column tile): the last program of the tile sums the 8 partials in
    slice order, so every call (and on a GPU every graph replay) gives the same bits, close to the reference."""
    dtype = DTYPES[0]
    qw = fq.quantize(torch.randn(40, 4096, device=DEVICE).to(dtype), bits, group_size)
    x = torch.randn(3, 4096, device=DEVICE).to(dtype)
    want = fq.quant_matmul(x, qw, backend="reference")  # before the check copies new values into x

    def run(x):
        return quant_matmul_triton(x, qw.qdata, qw.scales, qw.zeros, bits, qw.effective_group_size, split_k=8)

    assert_qmm_close(assert_same_bits_across_calls_and_graph_replays(run, x), want, "split_k=8")


def test_large_m_tile_config():
    dtype = DTYPES[0]
    w = torch.randn(96, 256, device=DEVICE).to(dtype)
    qw = fq.quantize(w, 8, 128)
    x = torch.randn(130, 256, device=DEVICE).to(dtype)
    assert_qmm_close(fq.quant_matmul(x, qw, backend="triton"), fq.quant_matmul(x, qw, backend="reference"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, strategy", [(1, None), (16, None), (512, None), (512, "fused")])
def test_gpu_llama_mlp_shapes(dtype, m, strategy):
    for n, k in ((14336, 4096), (4096, 14336)):
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        qw = fq.quantize(w, 4, 128)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = quant_matmul_triton(x, qw.qdata, qw.scales, qw.zeros, 4, 128, strategy=strategy)
        assert_qmm_close(out, fq.quant_matmul(x, qw, backend="reference"), f"{n}x{k} m={m} {strategy}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size, k", [(32, 640), (64, 640), (128, 640), (256, 768), (-1, 2080)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_kernel_is_bit_for_bit_the_reference(dtype, bits, group_size, k, symmetric):
    """Odd N (a partial row tile); group 32: eight groups in a 256-column tile (a scale per column group);
    groups 64 / 128 / 256: one group per tile and row (a scale per row); per channel with K = 2080, a group size
    that is not a power of two and a partial last tile. Exactly dequantize_ref rounded to the dtype."""
    n = 67
    qw = fq.quantize(torch.randn(n, k, device=DEVICE).to(dtype), bits, group_size, symmetric)
    gs = qw.effective_group_size
    out = dequantize_triton(qw.qdata, qw.scales, qw.zeros, bits, gs, dtype)
    expected = dequantize_ref(unpack(qw.qdata, bits), qw.scales, qw.zeros, bits, gs).to(dtype)
    assert out.dtype == dtype and out.shape == (n, k)
    assert torch.equal(out, expected), (out.float() - expected.float()).abs().max()


@pytest.mark.parametrize("chunk_rows", [None, 16])  # 16 rows: four chunks of the dequantized weight + a tail
@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, -1)])
def test_prefill_sized_m_dequantizes_once_then_matmuls(monkeypatch, chunk_rows, bits, group_size):
    """From DEQUANT_GEMM_MIN_M[bits] on, backend="triton" dequantizes (in row chunks when the weight is large) and
    calls F.linear: checked to be the path taken, and against the reference."""
    dtype = DTYPES[0]
    n, k = 67, 256
    if chunk_rows:
        monkeypatch.setattr(qmm_module, "DEQUANT_CHUNK_ELEMENTS", chunk_rows * k)
    calls = []
    real = qmm_module.dequantize_triton
    monkeypatch.setattr(qmm_module, "dequantize_triton", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    qw = fq.quantize(torch.randn(n, k, device=DEVICE).to(dtype), bits, group_size, symmetric=False)
    x = torch.randn(DEQUANT_GEMM_MIN_M[bits], k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    out = fq.quant_matmul(x, qw, bias, backend="triton")
    assert calls == ([16, 16, 16, 16, 3] if chunk_rows else [n])
    assert_qmm_close(out, fq.quant_matmul(x, qw, bias, backend="reference"), f"chunks of {chunk_rows}")
    calls.clear()
    fq.quant_matmul(x[:-1], qw, backend="triton")
    assert calls == []  # one row fewer: the fused kernel


def test_split_k_tail_never_reads_past_the_last_group():
    # Per-channel scales live in a NaN-poisoned buffer: a K tile past the end that read scale column 1 would
    # turn the output into NaN (0 * NaN). K=200 -> 16-wide K tiles, 13 tiles, split 3 ways -> a padded tail.
    dtype = DTYPES[-1]
    w = torch.randn(67, 200, device=DEVICE).to(dtype)
    qw = fq.quantize(w, 8, -1)
    poisoned = torch.full((67, 2), float("nan"), device=DEVICE, dtype=qw.scales.dtype)
    poisoned[:, :1] = qw.scales
    x = torch.randn(1, 200, device=DEVICE).to(dtype)
    out = quant_matmul_triton(x, qw.qdata, poisoned[:, :1], None, 8, 200, split_k=3)
    assert_qmm_close(out, fq.quant_matmul(x, qw, backend="reference"), "poisoned tail")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_dequant_is_exact_for_every_code_and_zero_point(dtype, bits):
    """The kernel turns codes into floats by ORing them into a float's mantissa and subtracting (2^m + zero);
    that must equal code - zero exactly for every code and every zero point. With x = I the output is the
    dequantized weight itself (scales 1): one product per output, so no rounding may hide an error."""
    levels = 2**bits
    k = levels if bits == 8 else 2 * levels  # every code in every row, one row per zero point
    codes = (torch.arange(k) % levels).repeat(levels, 1)
    codes = ((codes + torch.arange(levels)[:, None]) % levels).to(torch.uint8)  # codes at every column too
    zeros = torch.arange(levels, dtype=torch.uint8)[:, None]
    scales = torch.ones(levels, 1, dtype=dtype)
    x = torch.eye(k, dtype=dtype)
    to = {"device": DEVICE}
    args = (fq.quant.pack(codes, bits).to(**to), scales.to(**to), zeros.to(**to), bits, k)
    expected = (codes.int() - zeros.int()).T.to(dtype)
    # M = k >= DEQUANT_GEMM_MIN_M[bits]: the fused kernel is forced, then the dequantize kernel checked on its own.
    out = quant_matmul_triton(x.to(**to), *args, strategy="fused")
    assert torch.equal(out.cpu(), expected), (out.cpu() - expected).abs().max()
    assert torch.equal(dequantize_triton(*args, dtype).cpu(), expected.T)


def test_int4_group_sizes_the_kernel_cannot_tile_raise_and_auto_avoids_them():
    from flashquant.quant import _auto_order, triton_supports

    qw = fq.quantize(torch.randn(32, 64), 4, 16)
    x = torch.randn(2, 64, dtype=DTYPES[0]).to(DEVICE)
    with pytest.raises(ValueError, match="group_size divisible by 32"):
        quant_matmul_triton(x, qw.qdata.to(DEVICE), qw.scales.to(DEVICE, x.dtype), None, 4, 16)
    assert not triton_supports(qw)
    assert triton_supports(fq.quantize(torch.randn(32, 64), 8, 16))
    assert triton_supports(fq.quantize(torch.randn(32, 64), 4, -1))
    cuda = torch.device("cuda")
    assert _auto_order(cuda, 64, cuda_ok=False, triton_ok=False) == ("torch",)
    assert _auto_order(cuda, 1, cuda_ok=True, triton_ok=False) == ("cuda", "torch")
    assert _auto_order(cuda, 64, cuda_ok=False) == ("triton", "torch")
