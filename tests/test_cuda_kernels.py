"""CUDA extension kernels vs the references (run only where the CUDA extension is built and a GPU exists)."""

import pytest
import torch

import flashquant as fq
from determinism import assert_same_bits_across_calls_and_graph_replays
from tolerances import assert_close, assert_flash_rule, assert_qmm_close, assert_qmm_same_rounding

if not fq.backends()["cuda"].available:
    pytest.skip("CUDA backend unavailable: " + fq.backends()["cuda"].reason, allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])  # 9: the first M with two n8 tiles
def test_cuda_quant_gemv(dtype, bits, group_size, symmetric, m):
    n, k = 1031, 4096  # odd N
    qw = fq.quantize(torch.randn(n, k, device="cuda", dtype=dtype), bits, group_size, symmetric)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = fq.quant_matmul(x, qw, backend="cuda")
    assert_qmm_close(out, fq.quant_matmul(x, qw, backend="reference"))
    # Sharper: the kernel's products are exact products of the dtype-rounded weights (tolerances.py).
    assert_qmm_same_rounding(out, (x.float() @ qw.dequantize().to(dtype).float().t()).to(dtype), "cuda gemv")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("n", [5, 77])
def test_cuda_quant_gemv_tail_steps_odd_groups_and_misaligned_views(dtype, bits, group_size, n):
    """K = 2080 is not a multiple of the kernel's 128-code step (a guarded last step in the last K slice); per
    channel, the group size 2080 is not a power of two (the division path); N < 16 leaves clamped rows; x is a
    contiguous view at a 2-byte offset, which the op must copy to an aligned buffer for its 16-byte loads."""
    k, m = 2080, 5
    qw = fq.quantize(torch.randn(n, k, device="cuda", dtype=dtype), bits, group_size, symmetric=False)
    x = torch.randn(m * k + 1, device="cuda", dtype=dtype)[1:].view(m, k)
    assert x.data_ptr() % 16 != 0
    out = fq.quant_matmul(x, qw, backend="cuda")
    assert_qmm_close(out, fq.quant_matmul(x, qw, backend="reference"))
    assert_qmm_same_rounding(
        out, (x.float() @ qw.dequantize().to(dtype).float().t()).to(dtype), "cuda gemv tail"
    )


def test_cuda_quant_gemv_rejects_unsupported_shapes():
    qw = fq.quantize(torch.randn(64, 48, device="cuda", dtype=torch.float16), 4, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        fq.quant_matmul(torch.randn(1, 48, device="cuda", dtype=torch.float16), qw, backend="cuda")


def test_cuda_quant_gemv_rejects_a_misaligned_weight_instead_of_copying_it_every_call():
    qw = fq.quantize(torch.randn(64, 256, device="cuda", dtype=torch.float16), 4, 128)
    shifted = torch.empty(qw.qdata.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view_as(qw.qdata)
    shifted.copy_(qw.qdata)
    bad = fq.QuantizedWeight(shifted, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.shape, qw.dtype)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        fq.quant_matmul(torch.randn(1, 256, device="cuda", dtype=torch.float16), bad, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_splits", [1, 4, 0])
@pytest.mark.parametrize("heads", [(32, 8), (8, 1), (16, 16), (24, 2)])  # G = 4, 8, 1, 12 (two head tiles)
def test_cuda_flash_decoding(dtype, head_dim, paged, num_splits, heads):
    hq, hkv = heads
    B, cap, bs = 3, 1024, 32
    if head_dim == 256 and hq // hkv > 8:  # the kernel's accumulators for > 8 heads of 256 dims would spill
        q = torch.randn(1, 1, hq, head_dim, device="cuda", dtype=dtype)
        kc = torch.randn(1, 64, hkv, head_dim, device="cuda", dtype=dtype)
        lens = torch.tensor([10], dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match="head_dim 256 with up to 8"):
            fq.attention_with_kvcache(q, kc, kc, lens, backend="cuda")
        return
    lens = torch.tensor([1000, 0, 333], dtype=torch.int32, device="cuda")
    if paged:
        nblk = B * cap // bs + 4
        kc = torch.randn(nblk, bs, hkv, head_dim, device="cuda", dtype=dtype)
        table = torch.randperm(nblk, device="cuda")[: B * cap // bs].reshape(B, -1).to(torch.int32)
    else:
        kc, table = torch.randn(B, cap, hkv, head_dim, device="cuda", dtype=dtype), None
    vc = torch.randn_like(kc)
    q = torch.randn(B, 1, hq, head_dim, device="cuda", dtype=dtype)
    knew = torch.randn(B, 1, hkv, head_dim, device="cuda", dtype=dtype)
    # the fp32 oracle: fp32 copies of the same inputs, so its output is not rounded to `dtype`
    kc_r, vc_r, knew_r = kc.float(), vc.float(), knew.float()
    ref = fq.attention_with_kvcache(q.float(), kc_r, vc_r, lens, knew_r, knew_r, table, backend="reference")
    out = fq.attention_with_kvcache(q, kc, vc, lens, knew, knew, table, num_splits=num_splits, backend="cuda")
    assert_close(out.float(), ref.float(), dtype, "cuda decode")
    base = fq.attention_with_kvcache(q, kc.clone(), vc.clone(), lens + 1, backend="torch", block_table=table)
    assert_flash_rule(out, ref.float(), base, "cuda decode vs SDPA same dtype")


def test_cuda_flash_decoding_block_sizes_and_misaligned_q():
    """Pages of 16 and 48 keys (multiples of the kernel's 16-key step; 48 is not a power of two, which only the
    CUDA kernel accepts), a q view at a 2-byte offset (copied for the 16-byte loads); pages of 8 keys are refused
    by backend='cuda' and served by auto through another backend."""
    dtype, hq, hkv, d = torch.float16, 32, 8, 128
    lens = torch.tensor([300, 47], dtype=torch.int32, device="cuda")
    for bs in (16, 48, 8):
        nblk = 2 * (384 // bs) + 2
        kc = torch.randn(nblk, bs, hkv, d, device="cuda", dtype=dtype)
        vc = torch.randn_like(kc)
        table = torch.randperm(nblk, device="cuda")[: 2 * (384 // bs)].reshape(2, -1).to(torch.int32)
        q = torch.randn(2 * hq * d + 1, device="cuda", dtype=dtype)[1:].view(2, 1, hq, d)
        assert q.data_ptr() % 16 != 0
        ref = fq.attention_with_kvcache(
            q.float(), kc.float(), vc.float(), lens, block_table=table, backend="reference"
        )
        if bs % 16:
            with pytest.raises(ValueError, match="multiple of 16"):
                fq.attention_with_kvcache(q, kc, vc, lens, block_table=table, backend="cuda")
            out = fq.attention_with_kvcache(q, kc, vc, lens, block_table=table)
        else:
            out = fq.attention_with_kvcache(q, kc, vc, lens, block_table=table, backend="cuda")
        assert_close(out.float(), ref, dtype, f"cuda decode, pages of {bs}")


def test_cuda_ops_survive_graph_capture():
    qw = fq.quantize(torch.randn(512, 1024, device="cuda", dtype=torch.float16), 4, 128)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    ref = fq.quant_matmul(x, qw, backend="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fq.quant_matmul(x, qw, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = fq.quant_matmul(x, qw, backend="cuda")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_quant_gemv_split_k_sum_is_deterministic_across_calls_and_graph_replays(dtype):
    """N = 64 is one block of output channels, so the op splits K = 4096 eight ways and the kernel's last block per
    tile sums the slices (tile counters memset on every launch, graph replays included): bit-identical results
    every time, and a replay after new inputs were copied in matches an eager call on them."""
    qw = fq.quantize(torch.randn(64, 4096, device="cuda", dtype=dtype), 4, 128)
    x = torch.randn(3, 4096, device="cuda", dtype=dtype)
    want = fq.quant_matmul(x, qw, backend="reference")  # before the check copies new values into x
    first = assert_same_bits_across_calls_and_graph_replays(
        lambda x: fq.quant_matmul(x, qw, backend="cuda"), x
    )
    assert_qmm_close(first, want)
