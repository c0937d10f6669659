"""quantize / QuantizedWeight / quant_matmul on the CPU: torch and C++ (cpu) backends vs the reference."""

import itertools

import pytest
import torch

import flashquant as fq
from tolerances import (
    MSE_MIN_GAIN_DB,
    SQNR_DB_MIN,
    assert_qmm_close,
    assert_qmm_same_rounding,
    assert_within_ulps,
    sqnr_db,
)

CPU_OK = fq.backends()["cpu"].available


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_shapes_and_dequantize(bits, group_size, symmetric):
    w = torch.randn(48, 256, dtype=torch.float16)
    qw = fq.quantize(w, bits, group_size, symmetric)
    groups = 1 if group_size == -1 else 256 // group_size
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.shape == (48, 256 // (8 // bits))
    assert qw.scales.shape == (48, groups) and qw.scales.dtype == torch.float16
    assert (qw.zeros is None) == symmetric
    deq = qw.dequantize()
    assert deq.dtype == torch.float16 and deq.shape == w.shape
    step = qw.scales.float().repeat_interleave(256 // groups, dim=1)
    # symmetric: within half a step; asymmetric: the rounded zero point can cost up to one step at the range ends
    bound = step * (0.5 if symmetric else 1.0) + 1e-3  # + fp16 rounding of the dequantized value
    assert ((deq.float() - w.float()).abs() <= bound).all()


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "bits,group_size,symmetric", [(4, 32, True), (4, 64, False), (8, -1, True), (8, 32, False)]
)
def test_quantize_in_row_chunks_equals_the_reference_on_the_whole_matrix(
    dtype, bits, group_size, symmetric, method, monkeypatch
):
    """quantize() works through w a few rows at a time (bounded temporaries); rows are independent, so the result
    is the reference's on the whole matrix, bit for bit: 3 rows per chunk over N = 10 (a ragged last chunk), and a
    non-finite weight in the last chunk is still found. "mse": the reference quantization at the reference's
    clip ratios."""
    from flashquant import quant

    monkeypatch.setattr(quant, "_QUANTIZE_CHUNK_ELEMENTS", (3 * 128, 3 * 128))
    w = (torch.randn(10, 128) * 3).to(dtype)
    qw = fq.quantize(w, bits, group_size, symmetric, method=method)
    rq = fq.reference.quant
    clip = rq.mse_clip_ratios(w, bits, group_size, symmetric) if method == "mse" else 1.0
    codes, scales, zeros = rq.quantize_ref(w, bits, group_size, symmetric, clip)
    assert torch.equal(qw.qdata, fq.quant.pack(codes, bits)) and torch.equal(qw.scales, scales)
    assert (zeros is None and qw.zeros is None) or torch.equal(qw.zeros, zeros)
    w[9, 5] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        fq.quantize(w, bits, group_size, symmetric)


@pytest.mark.parametrize("bits,group_size", list(SQNR_DB_MIN))
def test_quantization_sqnr_of_layer_output(bits, group_size):
    w, x = torch.randn(256, 512), torch.randn(8, 512)
    qw = fq.quantize(w, bits, group_size)
    assert sqnr_db(x @ w.t(), fq.quant_matmul(x, qw, backend="reference")) >= SQNR_DB_MIN[(bits, group_size)]


def _group_sq_errors(w, qw):
    gs = qw.effective_group_size
    err = (qw.dequantize(torch.float32) - w.float()).square()
    return err.reshape(w.shape[0], -1, gs).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (4, -1), (8, -1), (8, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_method_is_never_worse_than_minmax_per_group_and_gains_on_int4(
    dtype, bits, group_size, symmetric
):
    """Min-max is one of the clip search's candidates, so every group's squared error is at most min-max's (exactly,
    not on average); on int4 the search must also buy the measured SQNR gain."""
    torch.manual_seed(0)
    w = torch.randn(256, 512).to(dtype)
    minmax = fq.quantize(w, bits, group_size, symmetric)
    mse = fq.quantize(w, bits, group_size, symmetric, method="mse")
    assert (_group_sq_errors(w, mse) <= _group_sq_errors(w, minmax)).all()
    gain = sqnr_db(w.float(), mse.dequantize(torch.float32)) - sqnr_db(
        w.float(), minmax.dequantize(torch.float32)
    )
    assert gain >= MSE_MIN_GAIN_DB.get((bits, group_size, symmetric), 0.0)


def test_mse_clip_ratios_keep_exact_grids_and_clip_gaussian_tails():
    """A group whose values already sit on its min-max grid keeps ratio 1 (zero error; ties go to the widest range);
    most Gaussian groups of 128 clip their tails (int4: the optimal range is ~2.5 sigma, their max ~2.6-3.2)."""
    rq = fq.reference.quant
    torch.manual_seed(0)
    grid = torch.arange(-7.0, 8.0).repeat(9)[:128] * 0.25  # codes -7..7 at scale 0.25: exact under min-max
    w = torch.cat([grid[None], torch.randn(63, 128)])
    ratios = rq.mse_clip_ratios(w, 4, 128, True)
    assert ratios[0, 0] == 1.0
    assert (ratios[1:] < 1.0).float().mean() > 0.75
    assert torch.isin(ratios, torch.tensor(rq.CLIP_RATIOS)).all()


def _clip_search_weights(dtype, K):
    """Gaussian and heavy-tailed rows plus the groups that stress the grid: zeros, a constant, a single outlier,
    ranges at the dtype's limits (fp16 scales that clamp to its smallest normal), values already on a grid."""
    torch.manual_seed(0)
    w = torch.cat([torch.randn(6, K) * 0.02, torch.distributions.StudentT(3.0).sample((6, K)) * 0.02])
    edge = torch.zeros(6, K)
    edge[1] = 3.0
    edge[2, 0] = -1.0
    edge[3] = torch.linspace(-6e4, 6e4, K)
    edge[4] = torch.randn(K) * 1e-6
    edge[5] = (torch.arange(K) % 15 - 7) * 0.25
    return torch.cat([w, edge]).to(dtype)


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
@pytest.mark.parametrize("simd", ["0", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "bits,group_size,K", [(4, 32, 128), (4, 128, 256), (4, -1, 262), (8, -1, 96), (8, 6, 66)]
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_mse_clip_search_picks_the_references_ratios(
    simd, dtype, bits, group_size, K, symmetric, monkeypatch
):
    """The C++ clip search (csrc/cpu/mse_clip.cpp) chooses, group for group, the ratio the reference chooses: the
    same grids and fp32 error terms, fp64 sums on both sides. Groups of 6 and a row of 262 run the SIMD path's
    scalar tail; "0" runs the portable path."""
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    rq = fq.reference.quant
    w = _clip_search_weights(dtype, K)
    got = torch.ops.flashquant.mse_clip_search(w, bits, group_size, symmetric, list(rq.CLIP_RATIOS))
    assert got.dtype == torch.float32
    assert torch.equal(got, rq.mse_clip_ratios(w, bits, group_size, symmetric))


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
def test_cpu_mse_clip_search_op_opcheck_and_errors():
    op = torch.ops.flashquant.mse_clip_search.default
    ratios = list(fq.reference.quant.CLIP_RATIOS)
    torch.library.opcheck(op, (torch.randn(4, 64), 4, 32, True, ratios))
    torch.library.opcheck(op, (torch.randn(3, 10, dtype=torch.bfloat16), 8, -1, False, [1.0, 0.5]))
    for args, match in [
        ((torch.randn(64), 4, 32, True, ratios), "2-D"),
        ((torch.randn(4, 64, dtype=torch.float64), 4, 32, True, ratios), "float32, float16 or bfloat16"),
        ((torch.randn(4, 64), 3, 32, True, ratios), "bits"),
        ((torch.randn(4, 64), 4, 48, True, ratios), "must divide"),
        ((torch.randn(4, 64), 4, 32, True, []), "ratios"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            op(*args)


def test_mse_search_without_the_cpu_extension_runs_the_reference_and_says_so(caplog, monkeypatch):
    """A CPU build without the C++ extension still quantizes with "mse" (same result), and logs once that the
    search is running as slow torch ops."""
    from flashquant import _dispatch, _ext, quant

    w = torch.randn(8, 64)
    expected = fq.quantize(w, 4, 32, method="mse")
    monkeypatch.setattr(_ext, "cpu_ext", lambda: (False, "flashquant._C could not be loaded (test)"))
    _dispatch.warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="flashquant"):
        qw = quant.quantize(w, 4, 32, method="mse")
        quant.quantize(w, 4, 32, method="mse")
    _dispatch.warn_once.cache_clear()
    assert torch.equal(qw.qdata, expected.qdata) and torch.equal(qw.scales, expected.scales)
    msgs = [r.getMessage() for r in caplog.records if "clip search runs as torch ops" in r.getMessage()]
    assert len(msgs) == 1 and "could not be loaded (test)" in msgs[0]


@pytest.mark.parametrize("backend", ["reference", "torch"] + (["cpu"] if CPU_OK else []))
def test_mse_quantized_weights_run_on_every_kernel(backend):
    """The clip search changes only the chosen scales and zero points, not the format: the kernels take the result."""
    w, x = torch.randn(64, 256), torch.randn(3, 256)
    qw = fq.quantize(w, 4, 64, False, method="mse")
    assert_qmm_close(
        fq.quant_matmul(x, qw, backend=backend), x @ qw.dequantize(torch.float32).t(), backend=backend
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_edge_values_never_nan(bits, symmetric):
    w = torch.zeros(6, 64)
    w[1] = 3.0  # all-equal group
    w[2, :32] = 1e-30  # underflowing range
    w[3] = torch.linspace(-6e4, 6e4, 64)  # extreme range (fp16 max 65504)
    w[4, 0] = -1.0  # a single non-zero
    w[5] = -2.5
    for dt, method in itertools.product((torch.float16, torch.float32, torch.bfloat16), ("minmax", "mse")):
        qw = fq.quantize(w.to(dt), bits, 32, symmetric, method=method)
        deq = qw.dequantize(torch.float32)
        assert torch.isfinite(qw.scales.float()).all() and (qw.scales.float() > 0).all()
        assert torch.isfinite(deq).all()
        assert torch.equal(deq[0], torch.zeros(64))  # zero group dequantizes exactly to zero
        x = (torch.randn(2, 64) * 1e-3).to(dt)  # small enough that the true products fit in fp16
        for backend in ["torch"] + (["cpu"] if CPU_OK else []):
            assert torch.isfinite(fq.quant_matmul(x, qw, backend=backend)).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(w=torch.randn(4, 100), group_size=128), ValueError, "must divide in_features"),
        (dict(w=torch.randn(4, 7), group_size=-1), ValueError, "must be even"),
        (dict(w=torch.randn(4, 64), bits=3), ValueError, "bits must be 4 or 8"),
        (dict(w=torch.randn(4, 64), group_size=0), ValueError, "group_size must be"),
        (dict(w=torch.randn(64)), ValueError, "w must be 2-D"),
        (dict(w=torch.randint(0, 3, (4, 64))), TypeError, "w must have dtype"),
        (dict(w=torch.full((4, 64), float("nan"))), ValueError, "inf or NaN"),
        (dict(w=torch.randn(4, 64), method="awq"), ValueError, "method must be one of"),
    ],
)
def test_quantize_validation(kwargs, exc, match):
    kwargs.setdefault("group_size", 32)
    with pytest.raises(exc, match=match):
        fq.quantize(**kwargs)


def test_int8_per_channel_allows_odd_k():
    w = torch.randn(5, 7)
    qw = fq.quantize(w, 8, -1)
    x = torch.randn(3, 7)
    assert_qmm_close(fq.quant_matmul(x, qw, backend="torch"), fq.quant_matmul(x, qw, backend="reference"))


def test_quant_matmul_validation():
    qw = fq.quantize(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError, match=r"x must have shape \(..., K=64\)"):
        fq.quant_matmul(torch.randn(2, 32), qw)
    with pytest.raises(TypeError, match="qweight must be a flashquant.QuantizedWeight"):
        fq.quant_matmul(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="bias must have shape"):
        fq.quant_matmul(torch.randn(2, 64), qw, torch.randn(9))
    with pytest.raises(TypeError, match="x must have dtype"):
        fq.quant_matmul(torch.randn(2, 64).double(), qw)


BACKENDS = ["torch"] + (["cpu"] if CPU_OK else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 4, 17])
def test_quant_matmul_matches_reference(backend, bits, group_size, symmetric, m):
    n, k = 37, 256 if group_size != -1 else 250  # odd N; per-channel with K not a multiple of 32
    w = torch.randn(n, k)
    qw = fq.quantize(w, bits, group_size, symmetric)
    x, bias = torch.randn(2, m, k), torch.randn(n)
    ref = fq.quant_matmul(x, qw, bias, backend="reference")
    out = fq.quant_matmul(x, qw, bias, backend=backend)
    assert out.shape == (2, m, n)
    assert_qmm_close(out, ref, f"{backend} bits={bits} g={group_size} sym={symmetric} m={m}", backend)


def _bias_backends():
    """(backend, device, dtypes, ms) for the bias test: the C++ CPU kernel, the Triton kernel (the interpreter on
    CPUs: fp16 only) and the CUDA GEMV (M <= 16) where each can run."""
    out = [("cpu", "cpu", (torch.float16, torch.bfloat16), (1, 9))] if CPU_OK else []
    if fq.backends()["triton"].available:
        gpu = torch.cuda.is_available()
        dtypes = (torch.float16, torch.bfloat16) if gpu else (torch.float16,)
        out.append(("triton", "cuda" if gpu else "cpu", dtypes, (1, 9)))
    if fq.backends()["cuda"].available:
        out.append(("cuda", "cuda", (torch.float16, torch.bfloat16), (1, 9)))
    return [
        pytest.param(b, d, dt, m, id=f"{b}-{str(dt)[6:]}-m{m}")
        for b, d, dts, ms in out
        for dt in dts
        for m in ms
    ]


@pytest.mark.parametrize("backend,device,dtype,m", _bias_backends())
def test_bias_is_added_before_the_one_rounding(backend, device, dtype, m):
    """The kernels add the bias to their fp32 sums before rounding to the dtype, as F.linear does. A bias that
    cancels row 0's product (bias = delta - x0 @ W, rounded to the dtype) leaves a result near delta; rounding
    x0 @ W first and adding the bias after (a second pass) errs by up to half an ulp of x0 @ W, ~30x an ulp of
    the result. Activations in {-1, 0, 1} with a 1 in every group are exact in the CPU kernel's int16 activations,
    so every backend's row 0 must be within one ulp of the exact result. m = 9 takes the CPU kernel's AMX path
    (bf16) and the CUDA GEMV's second activation tile; K = 2048 makes the Triton kernel and the CUDA GEMV split K
    (4-8 slices), so the bias goes in where the slices are summed."""
    torch.manual_seed(m)
    n, k, group = 40, 2048, 64
    qw = fq.quantize(torch.randn(n, k, dtype=dtype), 4, group, symmetric=False).to(device)
    x = torch.randint(-1, 2, (m, k)).float()
    x[:, ::group] = 1.0
    x = x.to(device, dtype)
    # what the backend multiplies: the CUDA GEMV rounds each dequantized weight to the dtype (tolerances.py)
    w = qw.dequantize(dtype if backend == "cuda" else torch.float32).float()
    product = x.float() @ w.t()
    delta = torch.rand(n, device=device) * 0.5 + 0.5
    bias = (delta - product[0]).to(dtype)
    out = fq.quant_matmul(x, qw, bias, backend=backend)
    assert out.dtype == dtype and out.shape == (m, n)
    strided = torch.stack((bias, -bias), 1)[:, 0]  # a view with stride 2
    assert torch.equal(fq.quant_matmul(x, qw, strided, backend=backend), out)
    expected = product[0] + bias.float()
    assert float(expected.abs().max()) < 1.5  # the cancellation happened: |x0 @ W| is tens here
    assert_within_ulps(out[0], expected, 1, f"{backend} {dtype} m={m}: row 0 (bias cancelling the product)")
    assert_qmm_close(
        out, fq.quant_matmul(x, qw, bias, backend="reference"), f"{backend} {dtype} m={m}", backend
    )


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [24, 61])
def test_cpu_kernel_large_m_spans_several_activation_blocks(bits, m):
    """Prefill-sized M: at K=4096 the AVX2 kernel takes activation rows in blocks of 24 (192 KB of int16);
    M=61 covers two full blocks and a ragged one (with a 1-row tile), M=24 exactly one."""
    n, k = 19, 4096
    qw = fq.quantize(torch.randn(n, k), bits, 128, symmetric=False)
    x = torch.randn(m, k)
    out = fq.quant_matmul(x, qw, backend="cpu")
    assert_qmm_close(out, fq.quant_matmul(x, qw, backend="reference"), f"bits={bits} m={m}", "cpu")


# The C++ kernel's instruction-set paths; FLASHQUANT_CPU_SIMD=<level> runs the best one this CPU has up to it.
CPU_LEVELS = ["scalar", "avx2", "avx_vnni", "avx512_vnni"]


@pytest.fixture(params=CPU_LEVELS)
def cpu_level(request, monkeypatch):
    """Runs the test on one instruction-set path of the C++ kernel; skips paths this CPU lacks."""
    if not CPU_OK:
        pytest.skip("C++ extension not built")
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", request.param)
    runs = torch.ops.flashquant.cpu_simd_level()
    if runs != request.param:
        pytest.skip(f"this CPU has no {request.param} (capped there, the kernel runs {runs})")
    return request.param


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 48, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_kernel_paths_match_reference(cpu_level, bits, group_size, symmetric):
    """Every path (scalar, AVX2, AVX-VNNI, AVX-512 VNNI with its 512-bit tile for groups of 64/128/256 and its
    256-bit tile for 32/48) over group sizes that are not multiples of the 32/64-code chunks (48: groups start
    mid-chunk), per-channel with K % 64 != 0, M covering the 8-, 4- and 1..3-row tiles, and an odd N. (Rows this
    short are read one weight row per tile; the paired tiles of rows >= 4 KB: the next test.)"""
    k = 768 if group_size != -1 else 4100
    n = 21
    qw = fq.quantize(torch.randn(n, k), bits, group_size, symmetric)
    ref_fn = lambda x: fq.quant_matmul(x, qw, backend="reference")  # noqa: E731
    for m in (1, 3, 6, 13):  # tiles of 1, 3, 4+2 and 8+4+1 (AVX2: 4+4+4+1) rows
        x = torch.randn(m, k)
        out = fq.quant_matmul(x, qw, backend="cpu")
        assert_qmm_close(
            out, ref_fn(x), f"{cpu_level} bits={bits} g={group_size} sym={symmetric} m={m}", "cpu"
        )


@pytest.mark.parametrize("bits,k", [(4, 8192), (8, 4096), (4, 4096)])
@pytest.mark.parametrize("group_size", [64, 128])
def test_cpu_kernel_pairs_weight_rows_of_a_page_or_more(cpu_level, bits, k, group_size):
    """With one or two activation rows the kernel reads two weight rows per tile (sharing each activation load)
    where a packed row fills a 4 KB page or more (int4 K = 8192, int8 K = 4096), and one row per tile below that
    (int4 K = 4096: two 2 KB rows in one page streamed slower in pairs). Both against the reference, with an odd N
    (two pairs and a lone row) and M = 1, 2 (paired tiles) and 3 (one-row tiles)."""
    torch.manual_seed(bits * k + group_size)
    qw = fq.quantize(torch.randn(5, k), bits, group_size, symmetric=False)
    for m in (1, 2, 3):
        x = torch.randn(m, k)
        assert_qmm_close(
            fq.quant_matmul(x, qw, backend="cpu"),
            fq.quant_matmul(x, qw, backend="reference"),
            f"{cpu_level} bits={bits} K={k} g={group_size} m={m}",
            "cpu",
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_kernel_converts_half_scales_per_task_exactly(cpu_level, dtype, symmetric):
    """fp16 / bf16 scales and uint8 zero points are converted to fp32 by each task for its own rows, 64 rows at a
    time at decode sizes (N = 301: several chunks and a partial one per task) and its whole range when M spans
    several activation blocks (M = 30 at K = 4096). The conversion is exact, so the output equals the kernel's on
    the same scales and zeros given as fp32, bit for bit."""
    torch.manual_seed(0)
    for n, k, group_size, ms in ((301, 256, 64, (1, 5)), (70, 4096, 128, (30,)), (301, 768, 48, (2,))):
        qw = fq.quantize(torch.randn(n, k, dtype=dtype), 4, group_size, symmetric)
        assert qw.scales.dtype == dtype and (symmetric or qw.zeros.dtype == torch.uint8)
        zeros_f = None if qw.zeros is None else qw.zeros.float()
        for m in ms:
            x = torch.randn(m, k, dtype=dtype)
            got = torch.ops.flashquant.quant_matmul_packed(x, qw.qdata, qw.scales, qw.zeros, 4, group_size)
            want = torch.ops.flashquant.quant_matmul_packed(
                x, qw.qdata, qw.scales.float(), zeros_f, 4, group_size
            )
            assert torch.equal(got, want), f"{cpu_level} {dtype} n={n} k={k} g={group_size} m={m}"


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_kernel_long_groups_do_not_overflow_int32(cpu_level, bits):
    """Per-channel rows of 16k codes at their largest (255 / 15) against all-positive activations: the SIMD
    paths sum int16 x code products in int32 lanes, which overflowed (a sign flip) before sums were flushed to
    fp32 every 1024 codes."""
    n, k = 3, 16384
    qdata = torch.full((n, k * bits // 8), 255, dtype=torch.uint8)
    scales = torch.ones(n, 1)
    x = torch.ones(2, k)
    out = torch.ops.flashquant.quant_matmul_packed(x, qdata, scales, None, bits, k)
    expected = float(((1 << bits) - 1 - (1 << (bits - 1))) * k)
    assert torch.allclose(out, torch.full_like(out, expected), rtol=1e-5), (out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_kernel_paths_and_dtypes(cpu_level, dtype, bits):
    w = torch.randn(33, 192, dtype=dtype)
    qw = fq.quantize(w, bits, 64, symmetric=False)
    x = torch.randn(5, 192, dtype=dtype)
    out = fq.quant_matmul(x, qw, backend="cpu")
    assert out.dtype == dtype
    assert_qmm_close(out, fq.quant_matmul(x, qw, backend="reference"), backend="cpu")


@pytest.fixture
def amx(monkeypatch):
    """The C++ kernel with its AMX-BF16 path allowed; skips on CPUs (or kernels) without AMX tiles."""
    if not CPU_OK:
        pytest.skip("C++ extension not built")
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", "amx_bf16")
    if torch.ops.flashquant.cpu_simd_level() != "amx_bf16":
        pytest.skip("this CPU or OS gives no AMX-BF16 tiles")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 96, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_amx_path_is_exact_to_one_bf16_ulp(amx, bits, group_size, symmetric):
    """bf16 activations at M >= 8 run on AMX tiles: codes and activations enter the tiles exactly and sums are fp32,
    so every output is within 1 bf16 ulp of the fp32 reference on the same bf16 inputs (a much tighter bound than
    QMM_RTOL_CPU). M covers one and two 16-row activation blocks (the streaming loop, with a ragged block), and 3
    and 5 blocks (the chunked loop). N = 45 leaves a partial 32-row weight block. Group 96 is an odd number of
    32-code tile steps; per-channel K = 1536 is one group longer than the 512-code decode chunk."""
    k = 768 if group_size != -1 else 1536
    n = 45
    qw = fq.quantize(torch.randn(n, k), bits, group_size, symmetric)
    for m in (8, 16, 17, 32, 40, 70):
        x = torch.randn(m, k).to(torch.bfloat16)
        out = fq.quant_matmul(x, qw, backend="cpu")
        assert out.dtype == torch.bfloat16
        ref = fq.quant_matmul(x.float(), qw, backend="reference")
        assert_within_ulps(out, ref, ulps=1, what=f"amx bits={bits} g={group_size} sym={symmetric} m={m}")


def test_cpu_amx_path_takes_bf16_only_and_m_from_8(amx):
    """Which path runs, told apart by an input the VNNI path's int16 activation rounding visibly misses: each group
    holds one activation of 1600 (on a weight column that quantizes to exactly 0) and ones elsewhere. The VNNI
    path's per-group scale 1600 / 32767 turns the ones into 20 steps = 0.977, a 2.3% error on every output; the AMX
    path is exact up to the output's bf16 rounding (0.4%). bf16 at M >= 8 must take AMX; fp16, fp32 and M < 8 the
    VNNI path."""
    k, n, group_size = 512, 40, 128
    w = torch.randn(n, k)
    w[:, ::group_size] = 0.0  # symmetric quantization maps 0 to the zero point exactly
    qw = fq.quantize(w, 4, group_size, symmetric=True)
    x = torch.ones(8, k)
    x[:, ::group_size] = 1600.0  # exact in bf16, fp16 and fp32

    def rel_err(dtype, m):
        xv = x[:m].to(dtype)
        out = fq.quant_matmul(xv, qw, backend="cpu").float()
        ref = fq.quant_matmul(xv.float(), qw, backend="reference")
        return float((out - ref).abs().max() / ref.abs().max())

    assert rel_err(torch.bfloat16, 8) < 0.005
    for dtype, m in ((torch.bfloat16, 7), (torch.float16, 8), (torch.float32, 8)):
        assert rel_err(dtype, m) > 0.015, (dtype, m)


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
def test_cpu_ops_opcheck_and_auto_takes_the_cpu_backend_at_every_m():
    qw = fq.quantize(torch.randn(16, 64), 4, 32)
    x = torch.randn(1, 64)
    bias = torch.randn(16)
    for b in (None, bias):
        torch.library.opcheck(
            torch.ops.flashquant.quant_matmul.default, (x, qw.qdata, qw.scales, qw.zeros, b, 4, 32, "cpu")
        )
        torch.library.opcheck(
            torch.ops.flashquant.quant_matmul_packed.default, (x, qw.qdata, qw.scales, None, 4, 32, b)
        )
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(
            torch.ops.flashquant.dequantize_packed.default, (qw.qdata, qw.scales, None, 4, 32, dtype)
        )
        for b in (None, bias):
            torch.library.opcheck(
                torch.ops.flashquant.dequant_matmul_packed.default,
                (x.to(dtype), qw.qdata, qw.scales, None, 4, 32, 5 * 64, b),
            )
    with pytest.raises(RuntimeError, match=r"bias must be \(N=16,\)"):
        torch.ops.flashquant.quant_matmul_packed(x, qw.qdata, qw.scales, None, 4, 32, torch.randn(15))
    with pytest.raises(RuntimeError, match="bias must be a floating-point"):
        torch.ops.flashquant.dequant_matmul_packed(
            x, qw.qdata, qw.scales, None, 4, 32, 64, torch.ones(16).int()
        )
    from flashquant import _dispatch
    from flashquant.quant import _auto_order

    # the cpu backend picks its own strategy by M (quant_matmul_cpu), so auto never needs the torch path
    for m in (1, 16, 512, 4096):
        assert _dispatch.resolve("quant_matmul", "auto", x.device, _auto_order(x.device, m)) == "cpu"


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
def test_cpu_dequant_min_m_follows_the_measured_crossovers(monkeypatch):
    """The M from which backend="cpu" dequantizes + calls BLAS (quant.py has the measurements behind each, and the
    estimate behind the AVX2 one)."""
    from flashquant import quant

    for level, amx in (("amx_bf16", True), ("avx512_vnni", True), ("avx512_vnni", False), ("avx2", False)):
        monkeypatch.setattr(quant, "cpu_kernel_level", lambda v=level: v)
        monkeypatch.setattr(quant, "cpu_has_amx", lambda v=amx: v)
        avx512 = level in ("amx_bf16", "avx512_vnni")
        assert quant.cpu_dequant_min_m(torch.float32) == (128 if avx512 else 256)
        # without AMX half precision goes through the fp32 GEMM, so it switches where fp32 does
        assert quant.cpu_dequant_min_m(torch.bfloat16) == (512 if amx else 128 if avx512 else 256)
        assert quant.cpu_dequant_min_m(torch.float16) == (128 if amx or avx512 else 256)
        assert quant.cpu_dequant_strategy(torch.float32) == "dequant"
        for dtype in (torch.bfloat16, torch.float16):
            assert quant.cpu_dequant_strategy(dtype) == ("dequant" if amx else "dequant_fp32")
        # never below the floor quant_matmul_cpu checks first
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert (quant.cpu_dequant_min_m(dtype) or 1 << 30) >= quant._CPU_DEQUANT_MIN_M_ANY


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_backend_switches_to_dequant_from_min_m(dtype, bits, monkeypatch):
    """backend="cpu" runs the fused kernel below cpu_dequant_min_m and dequantize + BLAS from it on, in x's dtype or
    (half precision on CPUs without AMX) in fp32. The strategies round differently (int16 activations or exact AMX
    products; weights rounded to the dtype; weights in fp32), so torch.equal tells which one ran; the test first
    checks that they do differ at this shape."""
    from flashquant import quant

    min_m = 40
    monkeypatch.setattr(quant, "cpu_dequant_min_m", lambda dt: min_m)
    monkeypatch.setattr(quant, "_CPU_DEQUANT_MIN_M_ANY", min_m)
    k, n = 512, 24
    qw = fq.quantize(torch.randn(n, k), bits, 128, symmetric=False)
    args = (qw.qdata, qw.scales, qw.zeros, bits, 128)
    blas = quant.cpu_dequant_strategy(dtype)
    for m in (min_m - 1, min_m):
        x = torch.randn(m, k).to(dtype)
        fused = quant.quant_matmul_cpu(x, *args, strategy="fused")
        dequant = quant.quant_matmul_cpu(x, *args, strategy=blas)
        assert not torch.equal(fused, dequant)
        if dtype != torch.float32:
            other = "dequant" if blas == "dequant_fp32" else "dequant_fp32"
            assert not torch.equal(dequant, quant.quant_matmul_cpu(x, *args, strategy=other))
        assert torch.equal(fq.quant_matmul(x, qw, backend="cpu"), dequant if m >= min_m else fused)
    with pytest.raises(ValueError, match="strategy must be"):
        quant.quant_matmul_cpu(x, *args, strategy="blas")


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 6), (8, -1), (8, 32)])
@pytest.mark.parametrize("m", [1, 3, 130])
def test_cpu_dequant_strategy_is_dequantize_then_matmul(dtype, bits, group_size, m, monkeypatch):
    """The dequant strategy computes what dequantize() + F.linear does: the fp32 matmul of weights rounded to the
    dtype, plus the bias in the dtype, rounded once (one ulp apart at most). Chunks of 4 rows of N = 19 (five
    chunks, the last one ragged, each with its slice of the bias); int4 groups of 6 are shorter than one 16-code
    SIMD step (the dequantize tails: test_dequantize_...). M = 3 has no bias."""
    from flashquant import quant

    monkeypatch.setattr(quant, "CPU_DEQUANT_CHUNK_ELEMENTS", 4 * 384)
    n, k = 19, 384
    qw = fq.quantize(torch.randn(n, k), bits, group_size, symmetric=bits == 4)
    x = torch.randn(m, k).to(dtype)
    bias = None if m == 3 else torch.randn(n) * 8  # fp32: rounded to the dtype first, as F.linear needs it
    out = quant.quant_matmul_cpu(
        x, qw.qdata, qw.scales, qw.zeros, bits, qw.effective_group_size, "dequant", bias=bias
    )
    assert out.dtype == dtype and out.shape == (m, n)
    expected = x.float() @ qw.dequantize(dtype).float().t()
    if bias is not None:
        expected += bias.to(dtype).float()
    assert_qmm_same_rounding(out, expected.to(dtype), f"dequant {dtype} bits={bits} g={group_size} m={m}")


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 6), (8, -1)])
@pytest.mark.parametrize("m", [3, 130])
def test_cpu_dequant_fp32_strategy_is_the_fp32_matmul_rounded_once(dtype, bits, group_size, m, monkeypatch):
    """The dequant_fp32 strategy (half-precision activations on CPUs without a fast half GEMM) computes the fp32
    matmul of x widened and the fp32 weights, plus the bias in fp32, and rounds the output once to x's dtype; with
    fp32 activations it is the dequant strategy. Chunks of 4 rows of N = 19, as in the test above."""
    from flashquant import quant

    monkeypatch.setattr(quant, "CPU_DEQUANT_CHUNK_ELEMENTS", 4 * 384)
    n, k = 19, 384
    w = torch.randn(n, k).to(dtype)  # half weights give half scales: the op widens them
    qw = fq.quantize(w, bits, group_size, symmetric=bits == 4)
    x = torch.randn(m, k).to(dtype)
    bias = None if m == 3 else (torch.randn(n) * 8).to(dtype)
    out = quant.quant_matmul_cpu(
        x, qw.qdata, qw.scales, qw.zeros, bits, qw.effective_group_size, "dequant_fp32", bias=bias
    )
    assert out.dtype == dtype and out.shape == (m, n)
    expected = x.float() @ qw.dequantize(torch.float32).t()
    if bias is not None:
        expected += bias.float()
    assert_qmm_same_rounding(
        out, expected.to(dtype), f"dequant_fp32 {dtype} bits={bits} g={group_size} m={m}"
    )


@pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
def test_cpu_dequant_workspace_is_reused_safely_across_shapes_and_dtypes():
    """The dequant strategy keeps one chunk buffer per thread between calls: calls that need a larger buffer, then
    a smaller one, in other dtypes (other element sizes), each still compute their own matmul."""
    from flashquant import quant

    calls = [(4, 64, 512, torch.bfloat16), (8, 200, 1024, torch.float32), (4, 16, 256, torch.float16)]
    for bits, n, k, dtype in calls + calls[::-1]:
        qw = fq.quantize(torch.randn(n, k), bits, 64, symmetric=False)
        x = torch.randn(3, k).to(dtype)
        out = quant.quant_matmul_cpu(x, qw.qdata, qw.scales, qw.zeros, bits, 64, "dequant")
        expected = (x.float() @ qw.dequantize(dtype).float().t()).to(dtype)
        assert_qmm_same_rounding(out, expected, f"bits={bits} {n}x{k} {dtype}")
    with pytest.raises(RuntimeError, match="chunk_elements must be positive"):
        torch.ops.flashquant.dequant_matmul_packed(x, qw.qdata, qw.scales, qw.zeros, bits, 64, 0)


@pytest.mark.parametrize("simd", ["0", "avx2", "avx512_vnni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "bits,group_size,symmetric,k",
    [(4, 128, True, 384), (4, 3, False, 246), (4, 40, False, 240), (8, -1, True, 250), (8, 5, False, 250)],
)
def test_dequantize_matches_reference_bit_for_bit(simd, dtype, bits, group_size, symmetric, k, monkeypatch):
    """QuantizedWeight.dequantize (on the CPU the C++ op: scalar, AVX2 and AVX-512 paths) is exactly the
    reference's fp32 (code - zero) * scale rounded once to the dtype: int4 groups of 3 start at odd k (the scalar
    path), groups of 40 / 5 and per-channel K = 250 end in tails shorter than a 32- and a 16-code step; fp16 scales
    (from an fp16 weight) are widened first; a row of tiny weights gives bf16 / fp16 subnormals."""
    if not CPU_OK:
        pytest.skip("C++ extension not built")
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    if simd != "0" and torch.ops.flashquant.cpu_simd_level() != simd:
        pytest.skip(f"this CPU has no {simd}")
    w = torch.randn(13, k, dtype=torch.float16) * 3
    w[0] = 0.0  # a zero row
    qw = fq.quantize(w, bits, group_size, symmetric)
    # row 1 dequantizes to subnormals of the dtype: fp16 via an fp16-subnormal scale; bf16 shares fp32's exponent
    # range, so via fp32 scales that are fp32 subnormals
    if dtype == torch.bfloat16:
        qw.scales = qw.scales.float()
    qw.scales[1] = 1e-39 if dtype == torch.bfloat16 else 2e-6
    ref = fq.reference.quant.dequantize_ref(qw.codes(), qw.scales, qw.zeros, bits, group_size).to(dtype)
    out = qw.dequantize(dtype)
    assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (8, -1, False)])
def test_dequantize_op_on_each_device_traces_and_matches_the_reference(device, bits, group_size, symmetric):
    """flashquant::dequantize (QuantizedWeight.dequantize, quant_matmul's backward): the C++ op on CPUs, the Triton
    kernel on CUDA, bit for bit the reference; a custom op (opcheck) that torch.compile records whole."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    qw = fq.quantize(torch.randn(24, 96, device=device), bits, group_size, symmetric)
    for dtype in dtypes:
        ref = fq.reference.quant.dequantize_ref(qw.codes(), qw.scales, qw.zeros, bits, group_size).to(dtype)
        assert torch.equal(qw.dequantize(dtype), ref), dtype
    args = (qw.qdata, qw.scales, qw.zeros, bits, qw.effective_group_size, torch.float16)
    torch.library.opcheck(torch.ops.flashquant.dequantize.default, args)
    compiled = torch.compile(lambda: qw.dequantize(torch.float16), fullgraph=True, backend="eager")
    assert torch.equal(compiled(), qw.dequantize(torch.float16))


def test_cpu_kernel_level_follows_the_simd_cap(amx, monkeypatch):
    """auto's kernel-level check (cpu_dequant_min_m) reads the level on every call, so FLASHQUANT_CPU_SIMD caps it."""
    assert fq.quant.cpu_kernel_level() == "amx_bf16"
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", "avx512_vnni")
    assert fq.quant.cpu_kernel_level() != "amx_bf16"


def test_quant_matmul_compiles_fullgraph():
    qw = fq.quantize(torch.randn(16, 64), 8, -1)
    f = torch.compile(lambda x: fq.quant_matmul(x, qw), fullgraph=True, backend="eager")
    x = torch.randn(3, 64)
    assert torch.allclose(f(x), fq.quant_matmul(x, qw), atol=1e-5)
