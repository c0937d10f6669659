"""Public attention API on the CPU: the PyTorch backend against the reference, validation, custom ops."""

import pytest
import torch

import flashquant as fq
from tolerances import assert_close, max_err

SHAPES = [  # (B, Sq, Sk, Hq, Hkv, D)
    (2, 1, 1, 4, 4, 16),
    (1, 7, 13, 8, 2, 32),
    (2, 13, 7, 6, 1, 24),
    (1, 64, 64, 4, 2, 64),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (3, 2)])
@pytest.mark.parametrize("softcap_lse", [(0.0, False), (2.0, True)])
def test_torch_backend_matches_reference(shape, causal, window, softcap_lse):
    B, Sq, Sk, Hq, Hkv, D = shape
    softcap, return_lse = softcap_lse
    q, k, v = torch.randn(B, Sq, Hq, D), torch.randn(B, Sk, Hkv, D), torch.randn(B, Sk, Hkv, D)
    kw = dict(causal=causal, window_size=window, softcap=softcap, return_lse=True)
    ref, ref_lse = fq.attention(q, k, v, backend="reference", **kw)
    kw["return_lse"] = return_lse
    res = fq.attention(q, k, v, backend="torch", **kw)
    out = res[0] if return_lse else res
    assert_close(out, ref, torch.float32, "out")
    if return_lse:
        assert max_err(res[1], ref_lse) < 1e-5


def test_fp16_and_bf16_accepted_on_cpu():
    for dt in (torch.float16, torch.bfloat16):
        q = torch.randn(1, 5, 4, 16, dtype=dt)
        out = fq.attention(q, q[:, :, :2], q[:, :, :2], causal=True)
        assert out.dtype == dt and out.shape == q.shape


def test_empty_batch_and_zero_length():
    q = torch.randn(0, 3, 4, 16)
    assert fq.attention(q, torch.randn(0, 3, 2, 16), torch.randn(0, 3, 2, 16)).shape == (0, 3, 4, 16)
    q = torch.randn(1, 3, 4, 16)
    out, lse = fq.attention(q, torch.randn(1, 0, 2, 16), torch.randn(1, 0, 2, 16), return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_fully_masked_rows_are_zero_not_nan():
    q, k = torch.randn(1, 6, 2, 16), torch.randn(1, 2, 2, 16)
    for backend in ("reference", "torch"):
        out = fq.attention(q, k, k, causal=True, backend=backend)  # Sq > Sk: first 4 rows see nothing
        assert not torch.isnan(out).any() and torch.equal(out[0, :4], torch.zeros(4, 2, 16))


def test_non_contiguous_heads_are_accepted():
    qkv = torch.randn(2, 9, 3, 4, 16)  # packed QKV: strided views, last dim contiguous
    q, k, v = qkv.unbind(2)
    ref = fq.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, backend="reference")
    assert_close(fq.attention(q, k, v, causal=True, backend="torch"), ref, torch.float32)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (
            lambda: fq.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)),
            ValueError,
            "multiple of the number of KV heads",
        ),
        (
            lambda: fq.attention(
                torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8).half(), torch.randn(1, 2, 2, 8)
            ),
            TypeError,
            "share one dtype",
        ),
        (
            lambda: fq.attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            ValueError,
            "q must be 4-D",
        ),
        (
            lambda: fq.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)),
            ValueError,
            "head_dim",
        ),
        (
            lambda: fq.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 3, 2, 8)),
            ValueError,
            "v must have shape",
        ),
        (
            lambda: fq.attention(
                torch.randn(1, 2, 4, 8).int(), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
            ),
            TypeError,
            "q must have dtype",
        ),
        (
            lambda: fq.attention(
                torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), window_size=(-2, 0)
            ),
            ValueError,
            "window_size",
        ),
        (
            lambda: fq.attention(
                torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), softcap=-1.0
            ),
            ValueError,
            "softcap",
        ),
        (
            lambda: fq.attention(
                torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), backend="magic"
            ),
            ValueError,
            "backend must be",
        ),
        (
            lambda: fq.attention_varlen(
                torch.randn(2, 4, 8),
                torch.randn(2, 2, 8),
                torch.randn(2, 2, 8),
                torch.tensor([0, 2], dtype=torch.int32),
                torch.tensor([0, 2], dtype=torch.int32),
                2,
                2,
                backend="cuda",
            ),
            ValueError,
            "does not implement",
        ),
        (
            lambda: fq.attention(
                torch.randn(1, 2, 4, 8).transpose(-1, -2), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
            ),
            ValueError,
            "contiguous in its last dimension",
        ),
    ],
)
def test_attention_validation_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---- varlen -------------------------------------------------------------------------------------------
def _varlen_inputs(lens_q, lens_k, hq=4, hkv=2, d=16):
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), hq, d)
    k, v = torch.randn(sum(lens_k), hkv, d), torch.randn(sum(lens_k), hkv, d)
    return q, k, v, cq, ck


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_torch_matches_reference_with_empty_sequence(causal):
    q, k, v, cq, ck = _varlen_inputs([3, 0, 9], [5, 4, 9])
    ref, ref_lse = fq.attention_varlen(
        q, k, v, cq, ck, 9, 9, causal=causal, return_lse=True, backend="reference"
    )
    out, lse = fq.attention_varlen(q, k, v, cq, ck, 9, 9, causal=causal, return_lse=True, backend="torch")
    assert_close(out, ref, torch.float32)
    assert max_err(lse, ref_lse) < 1e-5 and lse.shape == (4, 12)


def test_varlen_validation():
    q, k, v, cq, ck = _varlen_inputs([3, 2], [3, 2])
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype"):
        fq.attention_varlen(q, k, v, cq.long(), ck, 3, 3)
    with pytest.raises(ValueError, match="non-decreasing"):
        fq.attention_varlen(q, k, v, torch.tensor([0, 3, 2], dtype=torch.int32), ck, 3, 3)
    with pytest.raises(ValueError, match="cu_seqlens_k must have shape"):
        fq.attention_varlen(q, k, v, cq, ck[:2], 3, 3)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        fq.attention_varlen(q, k, v, cq, ck, -1, 3)
    # a bound below a real length would make the Triton kernel drop rows: refused where it can be checked
    with pytest.raises(
        ValueError, match=r"max_seqlen_q=2 is below the longest sequence in cu_seqlens_q \(3\)"
    ):
        fq.attention_varlen(q, k, v, cq, ck, 2, 3)
    with pytest.raises(
        ValueError, match=r"max_seqlen_k=1 is below the longest sequence in cu_seqlens_k \(3\)"
    ):
        fq.attention_varlen(q, k, v, cq, ck, 3, 1)


# ---- kv cache -------------------------------------------------------------------------------------------
def make_cache(B, hkv, d, lens, paged, block_size=16, capacity=64, dtype=torch.float32):
    if paged:
        per_seq = capacity // block_size
        num_blocks = B * per_seq + 3
        kc = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
        table = torch.randperm(num_blocks)[: B * per_seq].reshape(B, per_seq).to(torch.int32)
    else:
        kc, table = torch.randn(B, capacity, hkv, d, dtype=dtype), None
    return kc, torch.randn_like(kc), torch.tensor(lens, dtype=torch.int32), table


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("snew", [0, 1, 4])
def test_kvcache_torch_matches_reference(paged, snew):
    B, hq, hkv, d = 3, 8, 2, 16
    kc, vc, lens, table = make_cache(B, hkv, d, [0, 14, 30], paged)
    q = torch.randn(B, max(snew, 1), hq, d)
    k = torch.randn(B, snew, hkv, d) if snew else None
    v = torch.randn(B, snew, hkv, d) if snew else None
    kc_r, vc_r = kc.clone(), vc.clone()
    ref, ref_lse = fq.attention_with_kvcache(
        q, kc_r, vc_r, lens, k, v, table, return_lse=True, backend="reference"
    )
    out, lse = fq.attention_with_kvcache(q, kc, vc, lens, k, v, table, return_lse=True, backend="torch")
    assert_close(out, ref, torch.float32)
    assert max_err(lse, ref_lse) < 1e-5
    assert torch.equal(kc, kc_r) and torch.equal(vc, vc_r)  # same in-place append


def test_kvcache_validation():
    kc, vc, lens, _ = make_cache(2, 2, 16, [10, 64], paged=False)
    q = torch.randn(2, 1, 4, 16)
    new = torch.randn(2, 1, 2, 16)
    with pytest.raises(ValueError, match="capacity"):
        fq.attention_with_kvcache(q, kc, vc, lens, new, new)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype"):
        fq.attention_with_kvcache(q, kc, vc, lens.long())
    with pytest.raises(ValueError, match="k and v must be given together"):
        fq.attention_with_kvcache(q, kc, vc, lens - 10, new, None)
    with pytest.raises(ValueError, match="block_table entries"):
        kc2, vc2, lens2, table = make_cache(2, 2, 16, [3, 3], paged=True)
        fq.attention_with_kvcache(q, kc2, vc2, lens2, block_table=table + 100)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        fq.attention_with_kvcache(q, kc, vc, lens[:1])


# ---- custom ops: registration, opcheck, torch.compile ------------------------------------------------------
def test_ops_are_registered_custom_ops():
    for name in ("attention", "attention_varlen", "attention_with_kvcache", "quant_matmul"):
        assert hasattr(torch.ops.flashquant, name)


def test_opcheck_attention_ops():
    q, k, v = torch.randn(1, 5, 4, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)
    torch.library.opcheck(
        torch.ops.flashquant.attention.default, (q, k, v, True, 0.25, -1, -1, 0.0, True, "torch")
    )
    q2, k2, v2, cq, ck = _varlen_inputs([3, 4], [5, 4])
    torch.library.opcheck(
        torch.ops.flashquant.attention_varlen.default,
        (q2, k2, v2, cq, ck, 4, 5, True, 0.25, -1, -1, 0.0, False, "torch"),
    )
    kc, vc, lens, table = make_cache(2, 2, 16, [3, 9], paged=True)
    new = torch.randn(2, 1, 2, 16)
    torch.library.opcheck(
        torch.ops.flashquant.attention_with_kvcache.default,
        (
            torch.randn(2, 1, 4, 16),
            kc,
            vc,
            lens,
            new,
            new.clone(),
            table,
            True,
            0.25,
            -1,
            -1,
            0.0,
            True,
            0,
            "torch",
        ),
    )


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_fullgraph(backend):
    """The ops trace as single nodes (the Triton launchers included: the kernel path's Python has no host
    sync), and the compiled result equals eager."""

    def f(q, k, v, kc, vc, lens, knew):
        a = fq.attention(q, k, v, causal=True, backend=backend)
        b = fq.attention_with_kvcache(q[:, -1:], kc, vc, lens, knew, knew, backend=backend)
        return a.sum() + b.sum()

    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    kc, vc, lens, _ = make_cache(2, 2, 16, [3, 9], paged=False)
    knew = torch.randn(2, 1, 2, 16)
    eager = f(q, k, v, kc.clone(), vc.clone(), lens, knew)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, kc.clone(), vc.clone(), lens, knew)
    assert torch.allclose(eager, compiled, atol=1e-4)


@pytest.mark.parametrize("sq, sk, causal", [(77, 77, True), (5, 77, True), (33, 40, False)])
def test_torch_backend_fp16_on_cpu_computes_in_fp32(sq, sk, causal):
    """On CPUs the PyTorch path widens fp16 to fp32 (PyTorch's fp16 CPU attention is 1.6-2.6x slower than fp32 and
    rounds its intermediates), so its output is the fp32 reference rounded once: within one fp16 ulp. Square
    causal (SDPA's is_causal), bottom-right causal with Sq < Sk (a mask) and no mask."""
    from tolerances import assert_within_ulps

    q = torch.randn(2, sq, 8, 64).half()
    k = torch.randn(2, sk, 2, 64).half()
    v = torch.randn(2, sk, 2, 64).half()
    out = fq.attention(q, k, v, causal=causal, backend="torch")
    expected = fq.attention(q.float(), k.float(), v.float(), causal=causal, backend="reference")
    assert out.dtype == torch.float16
    assert_within_ulps(out, expected.half().float(), 1, f"fp16 sq={sq} sk={sk} causal={causal}")
