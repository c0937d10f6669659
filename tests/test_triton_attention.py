"""Triton attention kernels vs the fp32 reference. On a CPU-only machine they run under the Triton interpreter
(TRITON_INTERPRET=1, set in conftest.py) in fp16/fp32 on small shapes; with a GPU the same tests run on CUDA in
fp16/bf16 and the large-shape tests at the bottom apply flash-attn's 2x-of-PyTorch rule."""

import pytest
import torch

import flashquant as fq
from flashquant.reference import attention_ref
from tolerances import assert_close, assert_flash_rule, max_err

pytest.importorskip("triton")
if not fq.backends()["triton"].available:
    pytest.skip("triton backend unavailable: " + fq.backends()["triton"].reason, allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16, torch.float32]
HEADS = [(8, 2), (6, 1), (4, 4)]  # GQA, MQA, MHA


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


def check_against_reference(out, lse, ref, ref_lse, dtype, what):
    assert_close(out.float(), ref.float(), dtype, what)
    if lse is not None:
        assert max_err(lse, ref_lse) < 1e-3, f"{what}: lse"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 37), (37, 53), (53, 37), (64, 64), (17, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_forward(dtype, heads, sq, sk, causal):
    hq, hkv = heads
    q, k, v = (
        rand(2, sq, hq, 32, dtype=dtype),
        rand(2, sk, hkv, 32, dtype=dtype),
        rand(2, sk, hkv, 32, dtype=dtype),
    )
    out, lse = fq.attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    ref, ref_lse = attention_ref(q, k, v, causal)
    check_against_reference(out, lse, ref, ref_lse, dtype, f"sq={sq} sk={sk} causal={causal} heads={heads}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,softcap", [((4, 0), 0.0), ((3, 5), 0.0), ((-1, -1), 0.5), ((8, -1), 1.0)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_window_and_softcap(dtype, window, softcap, causal):
    q, k, v = (
        rand(1, 45, 8, 32, dtype=dtype),
        rand(1, 77, 2, 32, dtype=dtype),
        rand(1, 77, 2, 32, dtype=dtype),
    )
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    out, lse = fq.attention(q, k, v, return_lse=True, backend="triton", **kw)
    ref, ref_lse = attention_ref(q, k, v, causal, None, window, softcap)
    check_against_reference(out, lse, ref, ref_lse, dtype, str(kw))


@pytest.mark.parametrize("head_dim", [16, 59, 64, 111, 128, 256])
def test_head_dims_including_odd_ones(head_dim):
    dtype = DTYPES[0]
    q, k, v = (
        rand(1, 19, 4, head_dim, dtype=dtype),
        rand(1, 23, 2, head_dim, dtype=dtype),
        rand(1, 23, 2, head_dim, dtype=dtype),
    )
    out = fq.attention(q, k, v, causal=True, backend="triton")
    assert_close(out.float(), attention_ref(q, k, v, True)[0].float(), dtype, f"D={head_dim}")


def test_head_dim_over_256_is_a_clear_error():
    q = rand(1, 2, 2, 320, dtype=DTYPES[0])
    with pytest.raises(ValueError, match="head_dim"):
        fq.attention(q, q, q, backend="triton")


def test_fully_masked_rows_and_empty_keys():
    dtype = DTYPES[0]
    q, k = rand(1, 9, 4, 32, dtype=dtype), rand(1, 3, 2, 32, dtype=dtype)
    out, lse = fq.attention(q, k, k, causal=True, return_lse=True, backend="triton")
    assert (
        torch.equal(out[0, :6].float().cpu(), torch.zeros(6, 4, 32)) and torch.isneginf(lse[0, :, :6]).all()
    )
    out = fq.attention(q, k[:, :0], k[:, :0], backend="triton")
    assert torch.equal(out.float().cpu(), torch.zeros(1, 9, 4, 32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_varlen_with_empty_sequence(dtype, causal, heads):
    hq, hkv = heads
    lens_q, lens_k = [5, 0, 33, 1], [9, 4, 33, 70]
    cq = torch.tensor([0, 5, 5, 38, 39], dtype=torch.int32, device=DEVICE)
    ck = torch.tensor([0, 9, 13, 46, 116], dtype=torch.int32, device=DEVICE)
    q = rand(sum(lens_q), hq, 32, dtype=dtype)
    k, v = rand(sum(lens_k), hkv, 32, dtype=dtype), rand(sum(lens_k), hkv, 32, dtype=dtype)
    out, lse = fq.attention_varlen(q, k, v, cq, ck, 33, 70, causal=causal, return_lse=True, backend="triton")
    ref, ref_lse = fq.attention_varlen(
        q, k, v, cq, ck, 33, 70, causal=causal, return_lse=True, backend="reference"
    )
    check_against_reference(out, lse, ref, ref_lse, dtype, "varlen")


@pytest.mark.parametrize("num_splits", [1, 3, 0])
@pytest.mark.parametrize("heads", [(8, 2), (6, 1)])
def test_varlen_decode_batch_split_kv(num_splits, heads):
    """Continuous batching of decode steps (1-3 queries per sequence): each sequence's keys in num_splits pieces
    merged by LSE (0: the launcher's choice, which splits here: 4 sequences fill few programs), with a window,
    softcap, an empty sequence and one without keys; rows past cu_seqlens_q[-1] stay zero; a max_seqlen_k below the
    longest sequence (the caller's contract on CUDA, unchecked there) still attends to every key."""
    from flashquant.kernels import attention as tri

    dtype = DTYPES[0]
    hq, hkv = heads
    lens_q, lens_k = [1, 0, 3, 1, 2], [150, 9, 67, 0, 5]
    cq = torch.tensor([0, 1, 1, 4, 5, 7], dtype=torch.int32, device=DEVICE)
    ck = torch.tensor([0, 150, 159, 226, 226, 231], dtype=torch.int32, device=DEVICE)
    q = rand(sum(lens_q) + 2, hq, 32, dtype=dtype)
    k, v = rand(sum(lens_k), hkv, 32, dtype=dtype), rand(sum(lens_k), hkv, 32, dtype=dtype)
    for causal, window, softcap, max_k in [
        (True, (-1, -1), 0.0, 150),
        (False, (40, 0), 2.0, 150),
        (True, (-1, -1), 0.0, 70),
    ]:
        ref, ref_lse = fq.attention_varlen(
            q, k, v, cq, ck, 3, 150, causal=causal, window_size=window, softcap=softcap, return_lse=True,
            backend="reference",
        )  # fmt: skip
        right = 0 if causal else window[1]
        out, lse = tri.attention_varlen(q, k, v, cq, ck, 3, max_k, causal, 32**-0.5, (window[0], right), softcap,
                                        True, num_splits)  # fmt: skip
        what = f"splits={num_splits} causal={causal} window={window} softcap={softcap} max_seqlen_k={max_k}"
        check_against_reference(out, lse, ref, ref_lse, dtype, what)
        assert not out[-2:].any() and torch.isneginf(lse[:, -2:]).all(), what
        out_only, _ = tri.attention_varlen(q, k, v, cq, ck, 3, max_k, causal, 32**-0.5, (window[0], right), softcap,
                                           False, num_splits)  # fmt: skip
        assert torch.equal(out_only, out), what


def test_no_keys_anywhere_gives_zeros():
    """max_seqlen_k = 0 (every sequence keyless) and a zero-capacity KV cache: zeros and lse -inf, not a division by
    zero while sizing the key splits, nor an empty launch that leaves the output uninitialised."""
    dtype = DTYPES[0]
    q, k = rand(3, 4, 16, dtype=dtype), rand(0, 2, 16, dtype=dtype)
    cq, ck = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in ([0, 1, 3], [0, 0, 0]))
    out, lse = fq.attention_varlen(q, k, k, cq, ck, 2, 0, causal=True, return_lse=True, backend="triton")
    assert not out.float().abs().sum() and torch.isneginf(lse).all()
    cache = rand(2, 0, 2, 16, dtype=dtype)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out, lse = fq.attention_with_kvcache(q[:2, None], cache, cache, lens, return_lse=True, backend="triton")
    assert not out.float().abs().sum() and torch.isneginf(lse).all()


def make_cache(B, hkv, d, lens, paged, dtype, block_size=16, capacity=96):
    if paged:
        per_seq = capacity // block_size
        num_blocks = B * per_seq + 5
        kc = rand(num_blocks, block_size, hkv, d, dtype=dtype)
        perm = torch.randperm(num_blocks)[: B * per_seq]  # shuffled block table
        table = perm.reshape(B, per_seq).to(torch.int32).to(DEVICE)
    else:
        kc, table = rand(B, capacity, hkv, d, dtype=dtype), None
    return kc, torch.randn_like(kc), torch.tensor(lens, dtype=torch.int32, device=DEVICE), table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged,block_size", [(False, 0), (True, 16), (True, 32)])
@pytest.mark.parametrize("sq,snew", [(1, 0), (1, 1), (3, 3), (4, 0)])
@pytest.mark.parametrize("num_splits", [1, 3, 0])
@pytest.mark.parametrize("heads", [(8, 2), (6, 1)])
def test_kvcache_decode(dtype, paged, block_size, sq, snew, num_splits, heads):
    hq, hkv = heads
    B, d = 3, 64
    lens = [15, 47, 0]  # 15 + 3 and 47 + 1 cross 16-token block boundaries when appending
    kc, vc, cache_seqlens, table = make_cache(B, hkv, d, lens, paged, dtype, block_size or 16)
    q = rand(B, sq, hq, d, dtype=dtype)
    knew = rand(B, snew, hkv, d, dtype=dtype) if snew else None
    vnew = rand(B, snew, hkv, d, dtype=dtype) if snew else None
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref, ref_lse = fq.attention_with_kvcache(
        q, kc_ref, vc_ref, cache_seqlens, knew, vnew, table, return_lse=True, backend="reference"
    )
    out, lse = fq.attention_with_kvcache(
        q, kc, vc, cache_seqlens, knew, vnew, table, return_lse=True, num_splits=num_splits, backend="triton"
    )
    check_against_reference(
        out, lse, ref, ref_lse, dtype, f"paged={paged} sq={sq} snew={snew} splits={num_splits}"
    )
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), "in-place append differs from the reference"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged,block_size", [(False, 0), (True, 16), (True, 64)])
@pytest.mark.parametrize("hkv,d,snew", [(3, 80, 1), (8, 64, 5), (1, 32, 20)])
def test_append_kv_kernel_writes_what_pytorch_indexing_writes(dtype, paged, block_size, hkv, d, snew):
    """The Triton KV-cache append vs PyTorch indexing: bit-identical caches, with k/v as strided slices of one
    fused projection output, shuffled pages, appends that cross page boundaries, odd head counts and head_dim."""
    from flashquant.attention import append_kv
    from flashquant.kernels.append_kv import append_kv_triton

    lens = [15, 47, 0]
    kc, vc, seqlens, table = make_cache(3, hkv, d, lens, paged, dtype, block_size or 16, capacity=128)
    kv = rand(3, snew, 2 * hkv + 1, d, dtype=dtype)  # (k heads, v heads, one more): k and v are strided views
    k, v = kv[:, :, :hkv], kv[:, :, hkv : 2 * hkv]
    want_k, want_v = kc.clone(), vc.clone()
    append_kv(want_k, want_v, seqlens, k, v, table, backend="torch")
    lens_after = torch.full_like(seqlens, -7)
    append_kv_triton(kc, vc, seqlens, k, v, table, lens_after)  # also writes the lengths after the append
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert torch.equal(lens_after, seqlens + snew)


@pytest.mark.parametrize("paged", [False, True])
def test_append_kv_kernel_leaves_positions_past_the_cache_unwritten(paged):
    """cache_seqlens lives on the device, so on CUDA nothing checks it against the capacity: tokens that fall
    past the cache are dropped by the kernel instead of overwriting another sequence's cache or pages."""
    from flashquant.attention import append_kv

    dtype = DTYPES[0]
    kc, vc, _, table = make_cache(2, 2, 32, [0, 0], paged, dtype, capacity=64)
    k, v = rand(2, 4, 2, 32, dtype=dtype), rand(2, 4, 2, 32, dtype=dtype)
    want_k, want_v = kc.clone(), vc.clone()
    append_kv(kc, vc, torch.tensor([62, 10], dtype=torch.int32, device=DEVICE), k, v, table, backend="triton")

    # Expected: sequence 0 gets its first 2 tokens (positions 62, 63), sequence 1 all 4 (positions 10..13).
    def lens(*n):
        return torch.tensor(n, dtype=torch.int32, device=DEVICE)

    append_kv(want_k, want_v, lens(62, 10), k[:, :2], v[:, :2], table, backend="torch")
    if paged:  # sequence 1 alone: its block_table row over the shared pool
        append_kv(want_k, want_v, lens(12), k[1:, 2:], v[1:, 2:], table[1:], backend="torch")
    else:  # sequence 1 alone: its slice of the cache
        append_kv(want_k[1:], want_v[1:], lens(12), k[1:, 2:], v[1:, 2:], None, backend="torch")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_append_kv_validates_its_arguments_and_copies_a_strided_head_dim():
    from flashquant.attention import append_kv

    kc, vc, lens, _ = make_cache(2, 2, 16, [3, 9], False, torch.float32, capacity=32)
    k = v = torch.randn(2, 1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"k_cache must have shape \(B, \*, Hkv, D\)"):
        append_kv(kc[:1], vc[:1], lens, k, v)
    with pytest.raises(TypeError, match="v_cache must have dtype"):
        append_kv(kc, vc.half(), lens, k, v)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        append_kv(kc, vc, lens[:1], k, v)
    with pytest.raises(ValueError, match="v must have shape"):
        append_kv(kc, vc, lens, k, v[:, :, :1])
    # head_dim strided (every other element of a wider tensor): the kernel reads a contiguous copy
    wide = torch.randn(2, 1, 2, 32, device=DEVICE)
    want_k, want_v = kc.clone(), vc.clone()
    append_kv(
        want_k, want_v, lens, wide[..., ::2].contiguous(), wide[..., 1::2].contiguous(), backend="torch"
    )
    append_kv(kc, vc, lens, wide[..., ::2], wide[..., 1::2], backend="triton")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_append_kv_is_a_custom_op_that_passes_opcheck():
    kc, vc, lens, table = make_cache(2, 2, 16, [3, 9], True, torch.float32, 16)
    k, v = torch.randn(2, 2, 2, 16, device=DEVICE), torch.randn(2, 2, 2, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.flashquant.append_kv.default, (kc, vc, lens, k, v, table, "torch"))


@pytest.mark.parametrize("window,softcap", [((8, 0), 0.0), ((-1, -1), 0.7)])
def test_kvcache_window_softcap_split(window, softcap):
    dtype = DTYPES[0]
    kc, vc, lens, table = make_cache(2, 2, 32, [40, 70], True, dtype)
    q = rand(2, 2, 8, 32, dtype=dtype)
    kw = dict(window_size=window, softcap=softcap, return_lse=True)
    ref, ref_lse = fq.attention_with_kvcache(q, kc, vc, lens, block_table=table, backend="reference", **kw)
    out, lse = fq.attention_with_kvcache(
        q, kc, vc, lens, block_table=table, num_splits=4, backend="triton", **kw
    )
    check_against_reference(out, lse, ref, ref_lse, dtype, str(kw))


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_lengths_past_the_capacity_never_read_past_the_cache(paged):
    """On CUDA cache_seqlens is not checked against the capacity (that would need a host sync), so the kernel
    clamps it: a sequence claiming more keys than its cache holds attends to the whole cache, and the next
    sequence's cache (or the next block_table row) is never read. Called below the API's CPU-side check."""
    from flashquant.kernels import attention as tri

    dtype = DTYPES[0]
    kc, vc, _, table = make_cache(2, 2, 32, [0, 0], paged, dtype, capacity=64)
    q = rand(2, 1, 4, 32, dtype=dtype)
    too_long = torch.tensor([64 + 40, 30], dtype=torch.int32, device=DEVICE)
    out, _ = tri.attention_kvcache(q, kc, vc, too_long, table, True, 32**-0.5, (-1, -1), 0.0, False, 2)
    clamped = torch.tensor([64, 30], dtype=torch.int32, device=DEVICE)
    ref = fq.attention_with_kvcache(q, kc, vc, clamped, block_table=table, backend="reference")
    assert_close(out, ref, dtype, f"lengths past the capacity, paged={paged}")


@pytest.mark.parametrize("batch,hkv,num_splits", [(8192, 8, 3), (65536, 1, 2)])
def test_kvcache_launch_grid_fits_cuda_limits(monkeypatch, batch, hkv, num_splits):
    """CUDA caps grid axes 1 and 2 at 65535 programs, which batch * num_kv_heads passes at batch 8192 with 8 KV
    heads: the launcher must put it on axis 0. Too many programs to interpret, so this records the grid the
    launcher asks for (the kernel's decoding of its program id is what every other test here runs)."""
    from flashquant.kernels import attention as tri

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tri, "_attn_fwd_kernel", Recorder())
    monkeypatch.setattr(tri, "_combine_kernel", Recorder())
    dtype = DTYPES[0]
    # Stride-0 batch views: nothing runs, only the launcher's shapes matter.
    cache = rand(1, 1024, hkv, 16, dtype=dtype).expand(batch, -1, -1, -1)
    q = rand(1, 1, 2 * hkv, 16, dtype=dtype).expand(batch, -1, -1, -1)
    seqlens = torch.full((batch,), 200, dtype=torch.int32, device=DEVICE)
    tri.attention_kvcache(q, cache, cache, seqlens, None, True, 0.25, (-1, -1), 0.0, False, num_splits)
    fwd_grid = grids[0]
    assert all(n <= 65535 for n in fwd_grid[1:]), f"grid {fwd_grid} exceeds CUDA's 65535 on axis 1 or 2"
    assert torch.tensor(fwd_grid).prod().item() == batch * hkv * num_splits  # one program per (b, hkv, split)


def test_non_power_of_two_page_size_is_a_clear_error():
    dtype = DTYPES[0]
    kc = rand(4, 24, 2, 32, dtype=dtype)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        fq.attention_with_kvcache(
            rand(1, 1, 4, 32, dtype=dtype),
            kc,
            kc.clone(),
            torch.tensor([3], dtype=torch.int32, device=DEVICE),
            block_table=table,
            backend="triton",
        )


# ---- GPU only: large shapes, bf16, flash-attn's rule -------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_in_query_chunks(q, k, v, causal, chunk=1024):
    """attention_ref over query chunks (the full 16k x 16k fp32 score matrix would not fit): for a square
    causal problem, queries [i0, i1) see keys [0, i1) with the same bottom-right alignment."""
    outs = []
    for i0 in range(0, q.shape[1], chunk):
        i1 = min(q.shape[1], i0 + chunk)
        kk, vv = (k[:, :i1], v[:, :i1]) if causal else (k, v)
        # fp32 inputs, so the oracle's output is fp32 too (not rounded to q's dtype)
        outs.append(attention_ref(q[:, i0:i1].float(), kk.float(), vv.float(), causal)[0])
    return torch.cat(outs, 1)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [1024, 4096, 16384])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_llama3_prefill_flash_rule(dtype, seqlen, causal):
    q = rand(1, seqlen, 32, 128, dtype=dtype)
    k, v = rand(1, seqlen, 8, 128, dtype=dtype), rand(1, seqlen, 8, 128, dtype=dtype)
    ref = reference_in_query_chunks(q, k, v, causal)  # fp32 oracle
    base = fq.attention(q, k, v, causal=causal, backend="torch")  # PyTorch SDPA in the same dtype
    out = fq.attention(q, k, v, causal=causal, backend="triton")
    assert_flash_rule(out, ref, base, f"S={seqlen} causal={causal} {dtype}")


def test_chunked_reference_equals_full_reference():
    q, k, v = (
        rand(1, 40, 4, 16, dtype=torch.float32),
        rand(1, 40, 2, 16, dtype=torch.float32),
        rand(1, 40, 2, 16, dtype=torch.float32),
    )
    for causal in (False, True):
        full = attention_ref(q, k, v, causal)[0]
        assert torch.allclose(reference_in_query_chunks(q, k, v, causal, chunk=16), full, atol=1e-6)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_decode_long_cache_flash_rule(dtype, paged):
    B, cap = 4, 16384
    kc, vc, lens, table = make_cache(B, 8, 128, [16000, 5, 9000, 12345], paged, dtype, 64, cap)
    q = rand(B, 1, 32, 128, dtype=dtype)
    ref = fq.attention_with_kvcache(
        q.float(), kc.float(), vc.float(), lens, block_table=table, backend="torch"
    )
    base = fq.attention_with_kvcache(q, kc, vc, lens, block_table=table, backend="torch")
    out = fq.attention_with_kvcache(q, kc, vc, lens, block_table=table, backend="triton")
    assert_flash_rule(out, ref, base, f"decode paged={paged} {dtype}")
