"""The C++ CPU attention kernel behind attention_with_kvcache(backend="cpu") against the fp32 reference: its
AVX-512, AVX2 and portable paths, fp32/fp16/bf16, contiguous and paged caches, masks, splits of the keys, and the
dispatch."""

import importlib
import math
import random

import pytest
import torch

import flashquant as fq
from flashquant import _dispatch
from test_attention_api import make_cache
from tolerances import assert_close, assert_one_rounding, max_err

CPU_OK = _dispatch.backends()["cpu"].available
pytestmark = pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")

# (B, Sq, Hq, Hkv, D): Llama-3 heads (GQA 4), MQA with two 8-row tiles per KV head, MHA, a row count that leaves a
# partial tile (Sq=3 x G=4 = 12 rows), head_dim 40 (not a multiple of 8: the portable path even with AVX2), tiny D.
# In bf16 on CPUs with AMX, rows per KV head (Sq x G) >= 12 and D % 32 == 0 take the tile path: one 16-row tile
# (Sq=2 x G=8, D=64), 12 rows at D=256 (the fewest it takes), and a full tile plus a partial one (20 rows, D=96).
SHAPES = [
    (2, 1, 8, 2, 128),
    (1, 2, 8, 1, 64),
    (3, 1, 4, 4, 32),
    (2, 3, 8, 2, 16),
    (2, 2, 6, 3, 40),
    (1, 1, 2, 1, 8),
    (2, 3, 4, 1, 256),
    (1, 5, 8, 2, 96),
]
# (causal, window, softcap)
MASKS = [(True, (-1, -1), 0.0), (False, (-1, -1), 0.0), (True, (37, -1), 0.0), (False, (20, 3), 2.5)]


def check(out, ref, lse, ref_lse, dtype, what):
    """fp16/bf16: the kernel computes in fp32 and rounds once, so one ulp of the output (tolerances.py);
    fp32: ATOL. lse (fp32 in both): 1e-5 absolute, -inf where the reference has -inf."""
    if dtype == torch.float32:
        assert_close(out, ref, dtype, what)
    else:
        assert_one_rounding(out, ref, what)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{what}: -inf lse rows differ"
    assert max_err(lse, ref_lse) < 1e-5, f"{what}: lse error {max_err(lse, ref_lse):.3g}"


# FLASHQUANT_CPU_SIMD: "1" the best path this CPU has (AMX tiles for bf16 where present, AVX-512 with AVX512-BF16
# otherwise where present), "avx512_vnni" the AVX-512 vector path even on AMX CPUs, "avx2" the AVX2 path, "0" the
# portable one. A path the CPU lacks runs the best one below it.
@pytest.mark.parametrize("simd", ["1", "avx512_vnni", "avx2", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("paged", [False, True])
def test_cpu_kvcache_matches_reference(monkeypatch, simd, dtype, shape, paged):
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    B, sq, hq, hkv, d = shape
    lens = [200, 1, 130][
        :B
    ]  # full capacity, a single key (fewer keys than query rows when Sq > 1), a ragged one
    kc, vc, lens, table = make_cache(B, hkv, d, lens, paged, capacity=208, dtype=dtype)
    q = torch.randn(B, sq, hq, d, dtype=dtype)
    for causal, window, softcap in MASKS:
        kw = dict(causal=causal, window_size=window, softcap=softcap, return_lse=True)
        ref, ref_lse = fq.attention_with_kvcache(
            q, kc, vc, lens, block_table=table, backend="reference", **kw
        )
        for splits in (1, 3):
            out, lse = fq.attention_with_kvcache(
                q, kc, vc, lens, block_table=table, num_splits=splits, backend="cpu", **kw
            )
            assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, hq, sq)
            check(out, ref, lse, ref_lse, dtype, f"{shape} paged={paged} {kw} splits={splits} simd={simd}")


def test_cpu_kvcache_appends_then_attends_like_the_reference():
    B, hq, hkv, d = 3, 8, 2, 64
    kc, vc, lens, table = make_cache(B, hkv, d, [0, 15, 100], True, capacity=128, dtype=torch.float16)
    q = torch.randn(B, 4, hq, d, dtype=torch.float16)
    k, v = torch.randn(B, 4, hkv, d, dtype=torch.float16), torch.randn(B, 4, hkv, d, dtype=torch.float16)
    kc_r, vc_r = kc.clone(), vc.clone()
    ref = fq.attention_with_kvcache(q, kc_r, vc_r, lens, k, v, table, backend="reference")
    out = fq.attention_with_kvcache(q, kc, vc, lens, k, v, table, backend="cpu")
    assert torch.equal(kc, kc_r) and torch.equal(
        vc, vc_r
    )  # the same in-place append (crosses a page at 15 -> 19)
    assert_one_rounding(out, ref, "append then attend")


@pytest.mark.parametrize("seed", range(8))
def test_cpu_kvcache_random_configurations_match_reference(monkeypatch, seed):
    """Options drawn together, which the grids above cross only in part: batch, GQA ratio (1-16), head_dim
    (multiple of 8 or not), Sq, dtype, contiguous or paged (pages of 16-64 keys, not always powers of two),
    appended tokens, causal / window / softcap / lse, the split count and the instruction-set path. 12 draws a
    seed; an ad-hoc run of ~80k such draws (with larger magnitudes and scales too) found no mismatch."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(12):
        B, hkv, G = rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4, 5, 8, 16])
        d, sq = rng.choice([8, 24, 32, 40, 64, 96, 128, 256]), rng.choice([1, 1, 2, 3, 4, 7, 12, 16])
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.bfloat16])
        block_size = rng.choice([None, 16, 48, 64])
        snew = rng.choice([0, 0, sq])
        capacity = rng.choice([17, 64, 200]) + snew
        if block_size:
            capacity = -(-capacity // block_size) * block_size
        lens = [rng.choice([0, capacity - snew, rng.randint(0, capacity - snew)]) for _ in range(B)]
        kw = dict(
            causal=rng.random() < 0.7,
            window_size=rng.choice([(-1, -1), (-1, -1), (0, -1), (37, -1), (5, 3), (-1, 0)]),
            softcap=rng.choice([0.0, 0.0, 0.0, 2.5]),
            return_lse=True,
        )
        simd = rng.choice(["1", "avx512_vnni", "avx2", "0"])
        splits = rng.choice([0, 1, 3, 7])
        what = f"B={B} Hkv={hkv} G={G} D={d} Sq={sq} {dtype} block={block_size} Snew={snew} lens={lens} {kw} "
        what += f"simd={simd} splits={splits}"
        kc, vc, lens_t, table = make_cache(
            B, hkv, d, lens, block_size is not None, block_size or 16, capacity, dtype
        )
        q = torch.randn(B, sq, hkv * G, d, dtype=dtype)
        k = torch.randn(B, snew, hkv, d, dtype=dtype) if snew else None
        v = torch.randn_like(k) if snew else None
        kc_r, vc_r = kc.clone(), vc.clone()
        ref, ref_lse = fq.attention_with_kvcache(
            q, kc_r, vc_r, lens_t, k, v, table, backend="reference", **kw
        )
        monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
        out, lse = fq.attention_with_kvcache(
            q, kc, vc, lens_t, k, v, table, num_splits=splits, backend="cpu", **kw
        )
        monkeypatch.delenv("FLASHQUANT_CPU_SIMD")
        assert torch.equal(kc, kc_r) and torch.equal(vc, vc_r), f"{what}: appended caches differ"
        check(out, ref, lse, ref_lse, dtype, what)


def test_cpu_kvcache_rows_without_keys_are_zero_with_lse_minus_inf():
    kc, vc, lens, _ = make_cache(2, 2, 16, [0, 2], False, capacity=8)
    q = torch.randn(2, 4, 4, 16)  # sequence 1: 2 keys, 4 causal rows -> rows 0 and 1 see nothing
    out, lse = fq.attention_with_kvcache(q, kc, vc, lens, return_lse=True, num_splits=2, backend="cpu")
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(
        out[1, :2], torch.zeros_like(out[1, :2])
    )
    assert (
        torch.isinf(lse[0]).all() and torch.isinf(lse[1, :, :2]).all() and torch.isfinite(lse[1, :, 2:]).all()
    )
    ref, ref_lse = fq.attention_with_kvcache(q, kc, vc, lens, return_lse=True, backend="reference")
    check(out, ref, lse, ref_lse, torch.float32, "empty rows")


def test_cpu_kvcache_more_splits_than_key_blocks():
    """Splits are whole key blocks (64 keys for fp32 at D = 32): 100 keys give two, so 7 of 9 splits are empty
    and must merge as nothing (lse -inf), not as zeros with weight."""
    kc, vc, lens, _ = make_cache(1, 1, 32, [100], False, capacity=100)
    q = torch.randn(1, 1, 4, 32)
    ref = fq.attention_with_kvcache(q, kc, vc, lens, backend="reference")
    for splits in (1, 2, 9):
        assert_close(
            fq.attention_with_kvcache(q, kc, vc, lens, num_splits=splits, backend="cpu"), ref, torch.float32
        )


def test_cpu_kvcache_strided_cache_views():
    """Caches that are views with padded head and sequence strides (a slice of a larger buffer)."""
    big_k, big_v = torch.randn(2, 90, 3, 40), torch.randn(2, 90, 3, 40)
    kc, vc = big_k[:, 5:85, 1:3, 4:36], big_v[:, 5:85, 1:3, 4:36]  # (2, 80, 2, 32), unit stride in D
    lens = torch.tensor([80, 33], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 32)
    ref = fq.attention_with_kvcache(q, kc.contiguous(), vc.contiguous(), lens, backend="reference")
    assert_close(fq.attention_with_kvcache(q, kc, vc, lens, backend="cpu"), ref, torch.float32)


@pytest.mark.parametrize("simd", ["1", "avx512_vnni", "avx2", "0"])
@pytest.mark.parametrize("paged", [False, True])
def test_cpu_kvcache_never_reads_past_the_lengths(monkeypatch, simd, paged):
    """Cache slots past each sequence's length hold NaN (as torch.empty may): no path may read them into the output,
    in particular not the AMX path's tiles of 16 / 32 keys over ragged lengths (bf16, 20 rows per KV head)."""
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    B, sq, hq, hkv, d = 3, 5, 8, 2, 64
    kc, vc, lens, table = make_cache(B, hkv, d, [37, 5, 64], paged, capacity=64, dtype=torch.bfloat16)
    for b, n in enumerate(lens.tolist()):
        for cache in (kc, vc):
            if table is None:
                cache[b, n:] = float("nan")
            else:  # the slots of sequence b's pages from position n on
                for pos in range(n, table.shape[1] * kc.shape[1]):
                    cache[table[b, pos // kc.shape[1]], pos % kc.shape[1]] = float("nan")
    q = torch.randn(B, sq, hq, d, dtype=torch.bfloat16)
    ref = fq.attention_with_kvcache(q, kc, vc, lens, block_table=table, backend="reference")
    assert not torch.isnan(ref).any()
    for splits in (1, 3):
        out = fq.attention_with_kvcache(q, kc, vc, lens, block_table=table, num_splits=splits, backend="cpu")
        assert_one_rounding(out, ref, f"NaN past the lengths, paged={paged} splits={splits} simd={simd}")


def test_cpu_kvcache_llama_shape_long_cache_splits_by_default():
    """Batch 1, 32/8 heads, 3000 cached bf16 keys: the default split count (2 tasks per thread) is used."""
    kc, vc, lens, _ = make_cache(1, 8, 128, [3000], False, capacity=3072, dtype=torch.bfloat16)
    q = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16)
    ref = fq.attention_with_kvcache(q, kc, vc, lens, backend="reference")
    assert_one_rounding(fq.attention_with_kvcache(q, kc, vc, lens, backend="cpu"), ref, "llama 3k")


def test_auto_picks_the_cpu_kernel_for_decode_on_cpu(monkeypatch):
    """The C++ kernel up to 16 new tokens per sequence. In bf16: up to 48 where the kernel multiplies on AMX tiles
    (head_dim % 32 == 0); else up to 8 on CPUs where torch multiplies bf16 on AMX tiles (its SDPA path wins from
    Sq = 16 there)."""
    attention = importlib.import_module("flashquant.attention")  # the module (flashquant.attention is the op)
    _kvcache_auto_order = attention._kvcache_auto_order

    cpu = torch.device("cpu")
    for torch_amx in (False, True):
        for kernel_amx in (False, True):
            monkeypatch.setattr(attention, "_torch_has_amx", lambda a=torch_amx: a)
            monkeypatch.setattr(attention, "_kernel_has_amx", lambda a=kernel_amx: a)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for head_dim in (128, 40):
                    bf16 = dtype == torch.bfloat16
                    most = 16
                    if bf16 and kernel_amx and head_dim % 32 == 0:
                        most = 48
                    elif bf16 and torch_amx:
                        most = 8
                    assert attention.cpu_kvcache_max_sq(dtype, head_dim) == most
                    for sq, order in (
                        (1, ("cpu", "torch")),
                        (most, ("cpu", "torch")),
                        (most + 1, ("torch",)),
                    ):
                        assert _kvcache_auto_order(cpu, False, sq, dtype, head_dim) == order, (
                            dtype,
                            head_dim,
                            sq,
                        )
    monkeypatch.undo()
    order = _kvcache_auto_order(cpu, False, 1, torch.float32, 16)
    assert _dispatch.resolve("attention_with_kvcache", "auto", cpu, order) == "cpu"
    kc, vc, lens, _ = make_cache(1, 2, 16, [10], False, capacity=16)
    q = torch.randn(1, 1, 4, 16)
    auto = fq.attention_with_kvcache(q, kc, vc, lens)
    assert torch.equal(auto, fq.attention_with_kvcache(q, kc, vc, lens, backend="cpu"))


def test_cpu_kvcache_op_opcheck_and_errors():
    kc, vc, lens, table = make_cache(2, 2, 16, [5, 9], True, capacity=32)
    q = torch.randn(2, 1, 4, 16)
    torch.library.opcheck(
        torch.ops.flashquant.kvcache_attention.default,
        (q, kc, vc, lens, table, 1 / math.sqrt(16), True, -1, -1, 0.0, 0),
    )
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        torch.ops.flashquant.kvcache_attention(q.half(), kc, vc, lens, table, 0.25, True, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.flashquant.kvcache_attention(q, kc, vc, lens + 100, table, 0.25, True, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="block_table entries"):
        torch.ops.flashquant.kvcache_attention(q, kc, vc, lens, table + 100, 0.25, True, -1, -1, 0.0, 0)


# ---- the C++ KV-cache append (append_kv(backend="cpu"), the append step of backend="cpu") -----------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("paged,block_size", [(False, 16), (True, 16), (True, 48)])
@pytest.mark.parametrize("hkv,d,snew", [(3, 40, 1), (8, 128, 5), (1, 8, 33)])
def test_cpu_append_writes_what_pytorch_indexing_writes(dtype, paged, block_size, hkv, d, snew):
    """The C++ append vs PyTorch indexing: bit-identical caches, with k/v as strided views of one fused projection
    output, shuffled pages (also of 48 keys, not a power of two), appends that cross pages, odd heads / head_dim,
    and an empty sequence next to one that fills its cache exactly."""
    from flashquant.attention import append_kv

    capacity = 96
    lens = [15, 0, capacity - snew]
    kc, vc, seqlens, table = make_cache(3, hkv, d, lens, paged, block_size, capacity, dtype)
    kv = torch.randn(3, snew, 2 * hkv + 1, d, dtype=dtype)  # (k heads, v heads, one more): strided views
    k, v = kv[:, :, :hkv], kv[:, :, hkv : 2 * hkv]
    want_k, want_v = kc.clone(), vc.clone()
    append_kv(want_k, want_v, seqlens, k, v, table, backend="torch")
    append_kv(kc, vc, seqlens, k, v, table, backend="cpu")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert seqlens.tolist() == lens, "the append must not change cache_seqlens"


def test_cpu_append_copies_a_strided_head_dim_and_a_strided_cache_view():
    from flashquant.attention import append_kv

    big_k, big_v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 4, 16)
    kc, vc = big_k[:, :32, 1:3], big_v[:, :32, 1:3]  # caches as views: strides of the larger tensor
    lens = torch.tensor([3, 30], dtype=torch.int32)
    wide = torch.randn(2, 2, 2, 32)
    k, v = wide[..., ::2], wide[..., 1::2]  # head_dim stride 2: the op copies them contiguous first
    want_k, want_v = kc.clone(), vc.clone()
    append_kv(want_k, want_v, lens, k.contiguous(), v.contiguous(), backend="torch")
    before_k, before_v = big_k.clone(), big_v.clone()
    append_kv(kc, vc, lens, k, v, backend="cpu")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    untouched = torch.ones_like(big_k, dtype=torch.bool)
    untouched[:, :32, 1:3] = False
    assert torch.equal(big_k[untouched], before_k[untouched]) and torch.equal(
        big_v[untouched], before_v[untouched]
    )


@pytest.mark.parametrize("paged", [False, True])
def test_cpu_append_past_the_capacity_raises_and_writes_nothing(paged):
    from flashquant.attention import append_kv

    kc, vc, _, table = make_cache(2, 2, 16, [0, 0], paged, capacity=64)
    k, v = torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2, 16)
    want_k, want_v = kc.clone(), vc.clone()
    with pytest.raises(
        ValueError, match=r"cache_seqlens\[0\] \+ Snew = 62 \+ 4 must lie in \[0, capacity=64\]"
    ):
        append_kv(kc, vc, torch.tensor([62, 10], dtype=torch.int32), k, v, table, backend="cpu")
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] \+ Snew = -1 \+ 4"):
        append_kv(kc, vc, torch.tensor([0, -1], dtype=torch.int32), k, v, table, backend="cpu")
    if paged:
        bad = table.clone()
        bad[1, 0] = kc.shape[0]
        with pytest.raises(ValueError, match=rf"block_table\[1, 0\] = {kc.shape[0]} is outside"):
            append_kv(kc, vc, torch.tensor([0, 0], dtype=torch.int32), k, v, bad, backend="cpu")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), (
        "a failed append must leave the caches as they were"
    )


def test_cpu_append_op_opcheck_and_auto_dispatch():
    from flashquant.attention import append_kv

    kc, vc, lens, table = make_cache(2, 2, 16, [3, 9], True, capacity=32)
    k, v = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    torch.library.opcheck(torch.ops.flashquant.kvcache_append.default, (kc, vc, lens, k, v, table))
    assert _dispatch.resolve("append_kv", "auto", kc.device, ("cpu", "torch")) == "cpu"
    want_k, want_v = kc.clone(), vc.clone()
    append_kv(want_k, want_v, lens, k, v, table, backend="torch")
    append_kv(kc, vc, lens, k, v, table)  # auto: the C++ copy on CPU tensors
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    with pytest.raises(TypeError, match="v_cache must have dtype"):
        append_kv(kc, vc.half(), lens, k, v, table, backend="cpu")


# ---- attention(backend="cpu"): the same kernel with k / v as a full cache ------------------------------------
# (B, Sq, Sk, Hq, Hkv, D): a decode step (Llama-3 heads, GQA 4), MQA, MHA, more queries than keys (causal rows that
# see nothing), a single key, odd sizes (head_dim 40, 7 heads per KV head), a square prefill of 16.
DENSE_SHAPES = [
    (2, 1, 100, 8, 2, 128),
    (1, 3, 37, 8, 1, 64),
    (3, 2, 19, 4, 4, 32),
    (2, 5, 3, 4, 2, 16),
    (1, 1, 1, 2, 1, 8),
    (2, 4, 33, 7, 1, 40),
    (1, 16, 16, 8, 2, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_cpu_dense_attention_matches_reference(dtype, shape):
    """flashquant.attention on the C++ kernel: bottom-right causal alignment, windows, softcap and lse as the
    reference defines them, within one rounding (fp16/bf16) of the fp32 reference."""
    B, sq, sk, hq, hkv, d = shape
    q = torch.randn(B, sq, hq, d, dtype=dtype)
    k, v = torch.randn(B, sk, hkv, d, dtype=dtype), torch.randn(B, sk, hkv, d, dtype=dtype)
    for causal, window, softcap in MASKS:
        kw = dict(causal=causal, window_size=window, softcap=softcap, return_lse=True)
        ref, ref_lse = fq.attention(q, k, v, backend="reference", **kw)
        out, lse = fq.attention(q, k, v, backend="cpu", **kw)
        assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, hq, sq)
        check(out, ref, lse, ref_lse, dtype, f"{shape} {kw}")


def test_cpu_dense_attention_takes_transformers_layouts_and_empty_inputs():
    """k / v as transformers hands them over, (B, Hkv, Sk, D) tensors transposed to (B, Sk, Hkv, D) views; and no
    keys or no batch rows: zeros with lse = -inf, as on the PyTorch path."""
    q = torch.randn(2, 32, 1, 64).transpose(1, 2)
    k, v = torch.randn(2, 8, 70, 64).transpose(1, 2), torch.randn(2, 8, 70, 64).transpose(1, 2)
    ref = fq.attention(q, k, v, causal=True, backend="reference")
    assert_close(fq.attention(q, k, v, causal=True, backend="cpu"), ref, torch.float32)
    q, none = torch.randn(1, 2, 4, 16), torch.randn(1, 0, 2, 16)
    out, lse = fq.attention(q, none, none, causal=True, return_lse=True, backend="cpu")
    assert torch.equal(out, torch.zeros_like(q)) and torch.isinf(lse).all()
    empty = torch.randn(0, 2, 4, 16)
    assert fq.attention(empty, empty[..., :2, :], empty[..., :2, :], backend="cpu").shape == empty.shape


def _spy_on_op(monkeypatch, op: str, record) -> list:
    """Wraps torch.ops.flashquant.<op> for this test: each call runs the real op and appends record(*args) to the
    returned list (which calls the public functions made, and with what)."""
    real, calls = getattr(torch.ops.flashquant, op), []
    monkeypatch.setattr(torch.ops.flashquant, op, lambda *a: calls.append(record(*a)) or real(*a))
    return calls


def test_auto_runs_dense_attention_on_the_cpu_kernel_for_decode_sized_sq(monkeypatch):
    """auto: the C++ kernel up to cpu_kvcache_max_sq query tokens (decode, e.g. a transformers model's step with
    attn_implementation="fq"), SDPA above it; with inputs that require grad, the PyTorch path (the kernel is
    forward-only)."""
    attention = importlib.import_module("flashquant.attention")
    calls = _spy_on_op(monkeypatch, "kvcache_attention", lambda *a: a[0].shape[1])
    most = attention.cpu_kvcache_max_sq(torch.float32, 16)
    k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    for sq in (1, most, most + 1):
        q = torch.randn(1, sq, 4, 16)
        out = fq.attention(q, k, v, causal=True)
        assert_close(out, fq.attention(q, k, v, causal=True, backend="reference"), torch.float32)
    assert calls == [1, most]
    q = torch.randn(1, 1, 4, 16, requires_grad=True)
    fq.attention(q, k, v, causal=True).sum().backward()
    assert calls == [1, most] and q.grad is not None


# ---- attention_varlen(backend="cpu"): the same kernel, each sequence's keys read from the packed k / v -----------
# (query lengths, key lengths, Hq, Hkv, D): continuous batching of decode steps (Llama-3 heads, GQA 4); an empty
# query sequence, a sequence without keys and one with more queries than keys (MQA); MHA with head_dim 40 (the
# portable path even with AVX2); 7 heads per KV head and a sequence long enough that its keys are split (flash-decoding
# within the call).
VARLEN_CASES = [
    ([1, 1, 1, 1], [100, 37, 1, 64], 8, 2, 128),
    ([3, 0, 5, 2], [9, 4, 0, 40], 4, 1, 64),
    ([2, 7], [33, 7], 4, 4, 40),
    ([1, 4, 1], [5, 3, 1100], 7, 1, 16),
]


def _varlen_inputs(q_lens, k_lens, hq, hkv, d, dtype, extra_rows=0):
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]) + extra_rows, hq, d, dtype=dtype)
    k, v = (torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype) for _ in range(2))
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("simd", ["1", "avx2", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_cpu_varlen_attention_matches_reference(monkeypatch, simd, dtype, case):
    """Per sequence: bottom-right causal alignment to its own keys, windows, softcap, lse (Hq, total_q); empty
    sequences and query rows past cu_seqlens_q[-1] (zeros, lse -inf); within one rounding of the fp32 reference."""
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    q_lens, k_lens, hq, hkv, d = case
    q, k, v, cu_q, cu_k = _varlen_inputs(q_lens, k_lens, hq, hkv, d, dtype, extra_rows=2)
    lengths = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens))
    for causal, window, softcap in MASKS:
        kw = dict(causal=causal, window_size=window, softcap=softcap, return_lse=True)
        ref, ref_lse = fq.attention_varlen(*lengths, backend="reference", **kw)
        out, lse = fq.attention_varlen(*lengths, backend="cpu", **kw)
        assert out.dtype == dtype and out.shape == q.shape and lse.shape == (hq, q.shape[0])
        check(out, ref, lse, ref_lse, dtype, f"{case} {kw} simd={simd}")
        assert not out[-2:].any() and torch.isinf(lse[:, -2:]).all()


def test_cpu_varlen_attention_strided_heads_and_explicit_splits():
    """q / k / v as column slices of one packed qkv projection (the layout serving engines hand over: token stride
    (Hq + 2 Hkv) * D), and the op called with a split count: the same as the reference."""
    hq, hkv, d = 8, 2, 32
    cu = torch.tensor([0, 5, 6, 90], dtype=torch.int32)
    qkv = torch.randn(90, hq + 2 * hkv, d)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    ref, ref_lse = fq.attention_varlen(
        q, k, v, cu, cu, 84, 84, causal=True, return_lse=True, backend="reference"
    )
    for splits in (1, 3, 7):
        out, lse = torch.ops.flashquant.varlen_attention(q, k, v, cu, cu, d**-0.5, True, -1, -1, 0.0, splits)
        check(out, ref, lse, ref_lse, torch.float32, f"splits={splits}")


def test_cpu_varlen_op_opcheck_and_errors():
    q, k, v, cu_q, cu_k = _varlen_inputs([1, 3], [5, 9], 4, 2, 16, torch.float32)
    torch.library.opcheck(
        torch.ops.flashquant.varlen_attention.default, (q, k, v, cu_q, cu_k, 0.25, True, -1, -1, 0.0, 0)
    )
    op = torch.ops.flashquant.varlen_attention
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        op(q.half(), k, v, cu_q, cu_k, 0.25, True, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="past total_q"):
        op(q, k, v, cu_q, cu_k + 1, 0.25, True, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        op(q, k, v, cu_q.flip(0), cu_k, 0.25, True, -1, -1, 0.0, 0)
    # Called directly the op takes sequences that start after row 0; rows before cu_seqlens_q[0] are zeros.
    out = op(q, k, v, torch.tensor([1, 2, 4], dtype=torch.int32), cu_k, 0.25, True, -1, -1, 0.0, 0)[0]
    assert not out[0].any() and out[1:].abs().sum() > 0


def test_auto_runs_varlen_attention_on_the_cpu_kernel_for_decode_sized_sequences(monkeypatch):
    """auto: the C++ kernel when max_seqlen_q is at most cpu_kvcache_max_sq; above it the kernel for the
    decode-sized sequences only (here the second), SDPA for the longer; the PyTorch path when the inputs require
    grad."""
    attention = importlib.import_module("flashquant.attention")
    calls = _spy_on_op(monkeypatch, "varlen_attention", lambda *a: a[0].shape[0])
    most = attention.cpu_kvcache_max_sq(torch.float32, 16)
    for sq in (1, most, most + 1):
        q, k, v, cu_q, cu_k = _varlen_inputs([sq, 1], [40, 3], 4, 2, 16, torch.float32)
        out = fq.attention_varlen(q, k, v, cu_q, cu_k, sq, 40, causal=True)
        ref = fq.attention_varlen(q, k, v, cu_q, cu_k, sq, 40, causal=True, backend="reference")
        assert_close(out, ref, torch.float32)
    assert calls == [2, most + 1, 1]
    q, k, v, cu_q, cu_k = _varlen_inputs([1, 1], [40, 3], 4, 2, 16, torch.float32)
    q.requires_grad_(True)
    fq.attention_varlen(q, k, v, cu_q, cu_k, 1, 40, causal=True).sum().backward()
    assert calls == [2, most + 1, 1] and q.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_splits_a_varlen_batch_mixing_prompt_chunks_and_decode_steps(monkeypatch, dtype):
    """A batch with query sequences past cpu_kvcache_max_sq among decode-sized ones (chunked prefill beside decode
    steps): auto runs each run of decode-sized sequences (empty ones included) in one kernel call and the longer
    ones with SDPA; outputs and lse land in their rows, rows past cu_seqlens_q[-1] stay zero, and every mask option
    agrees with the reference. A batch with only long (or empty) sequences makes no kernel call."""
    attention = importlib.import_module("flashquant.attention")
    calls = _spy_on_op(monkeypatch, "varlen_attention", lambda *a: a[3].tolist())
    most = attention.cpu_kvcache_max_sq(dtype, 32)
    q_lens = [1, most + 5, 0, 2, 1, most + 1, 3]
    k_lens = [50, most + 9, 7, 2, 0, most + 1, 600]
    q, k, v, cu_q, cu_k = _varlen_inputs(q_lens, k_lens, 8, 2, 32, dtype, extra_rows=2)
    lengths = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens))
    for causal, window, softcap in MASKS:
        kw = dict(causal=causal, window_size=window, softcap=softcap, return_lse=True)
        calls.clear()
        ref, ref_lse = fq.attention_varlen(*lengths, backend="reference", **kw)
        out, lse = fq.attention_varlen(*lengths, **kw)
        assert calls == [[0, 1], [0, 0, 2, 3], [0, 3]], calls  # runs {0}, {2, 3, 4} and {6}
        check(out, ref, lse, ref_lse, dtype, f"mixed batch {kw}")
        assert not out[-2:].any() and torch.isinf(lse[:, -2:]).all()
    # without lse the same outputs; a batch of long and empty sequences never reaches the kernel
    ref = fq.attention_varlen(*lengths, causal=True, backend="reference")
    assert_close(fq.attention_varlen(*lengths, causal=True), ref, dtype)
    calls.clear()
    q, k, v, cu_q, cu_k = _varlen_inputs([most + 2, 0], [most + 2, 4], 8, 2, 32, dtype)
    out = fq.attention_varlen(q, k, v, cu_q, cu_k, most + 2, most + 2, causal=True)
    assert_close(
        out,
        fq.attention_varlen(q, k, v, cu_q, cu_k, most + 2, most + 2, causal=True, backend="reference"),
        dtype,
    )
    assert calls == []


def test_mixed_varlen_batch_compiles_fullgraph_on_the_pytorch_path():
    """Under torch.compile auto cannot split a batch by cu_seqlens_q's values: the mixed batch traces as the one
    custom op on the PyTorch path (no graph break), with the eager split's result."""
    most = importlib.import_module("flashquant.attention").cpu_kvcache_max_sq(torch.float32, 16)
    q, k, v, cu_q, cu_k = _varlen_inputs([1, most + 3, 2], [30, most + 3, 9], 4, 2, 16, torch.float32)

    def f(q, k, v, cu_q, cu_k):
        return fq.attention_varlen(q, k, v, cu_q, cu_k, most + 3, max(30, most + 3), causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, cu_q, cu_k)
    assert_close(compiled, f(q, k, v, cu_q, cu_k), torch.float32)


def test_cpu_attention_splits_long_sequences_of_a_ragged_batch():
    """Default splits are per sequence (a long cache in pieces, short ones whole, empty ones none): the pieces of
    one sequence and the unused split slots of the others merge to the reference, for KV caches and packed
    varlen batches alike."""
    lens = [3000, 5, 0, 700, 1]
    kc, vc, cache_lens, _ = make_cache(5, 2, 64, lens, False, capacity=3008, dtype=torch.float16)
    q = torch.randn(5, 2, 8, 64, dtype=torch.float16)
    kw = dict(causal=True, return_lse=True)
    ref, ref_lse = fq.attention_with_kvcache(q, kc, vc, cache_lens, backend="reference", **kw)
    out, lse = fq.attention_with_kvcache(q, kc, vc, cache_lens, backend="cpu", **kw)
    check(out, ref, lse, ref_lse, torch.float16, "kvcache, ragged")
    k = torch.cat([kc[b, :n] for b, n in enumerate(lens)])
    v = torch.cat([vc[b, :n] for b, n in enumerate(lens)])
    cu_k = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    cu_q = torch.arange(0, 12, 2, dtype=torch.int32)
    out, lse = fq.attention_varlen(q.flatten(0, 1), k, v, cu_q, cu_k, 2, 3000, backend="cpu", **kw)
    check(out, ref.flatten(0, 1), lse, ref_lse.permute(1, 0, 2).flatten(1), torch.float16, "varlen, ragged")


def test_cpu_kvcache_seqstart_reads_each_sequence_past_its_left_padding():
    """seqstart_k (the op's, used for transformers' left-padded batches): sequence b's keys are cache positions
    seqstart_k[b] .. + seqlens_k[b], aligned bottom-right as if the padding were not there; beyond the capacity, or
    with a paged cache, it raises."""
    kc, vc = torch.randn(3, 40, 2, 32), torch.randn(3, 40, 2, 32)
    start, lens = torch.tensor([0, 7, 39], dtype=torch.int32), torch.tensor([40, 33, 1], dtype=torch.int32)
    q = torch.randn(3, 2, 8, 32)
    op = torch.ops.flashquant.kvcache_attention
    for causal, window, softcap in MASKS:
        out, lse = op(q, kc, vc, lens, None, 32**-0.5, causal, *window, softcap, 0, start)
        for b in range(3):
            keys = slice(int(start[b]), int(start[b] + lens[b]))
            ref, ref_lse = fq.attention(
                q[b : b + 1], kc[b : b + 1, keys], vc[b : b + 1, keys], causal, None, window, softcap, True,
                backend="reference",
            )  # fmt: skip
            check(out[b : b + 1], ref, lse[b : b + 1], ref_lse, torch.float32, f"b={b} {causal} {window}")
    with pytest.raises(RuntimeError, match="outside"):
        op(q, kc, vc, lens, None, 0.25, True, -1, -1, 0.0, 0, start + 1)
    kp, vp, plens, table = make_cache(3, 2, 32, [5, 9, 1], True, capacity=32)
    with pytest.raises(RuntimeError, match="seqstart_k needs a contiguous cache"):
        op(q, kp, vp, plens, table, 0.25, True, -1, -1, 0.0, 0, start)
