"""rms_norm, rotary_embedding and silu_mul: the Triton kernels (under TRITON_INTERPRET=1 on the CPU, fp16/fp32;
on a GPU also bf16) and the C++ CPU ops (fp32/fp16/bf16, AVX2 and portable paths) against the fp32 references,
input validation, dispatch and the custom-op registration.
Tolerances: tests/tolerances.py (kernels: one rounding of the fp32 result; the "torch" backend: Hugging Face's
forms, rounded up to three times in the dtype)."""

import pytest
import torch

import flashquant as fq
from flashquant import _dispatch, layer_ops
from flashquant import reference as ref
from tolerances import assert_one_rounding, assert_torch_layer_op_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
CPU_OK = _dispatch.backends()["cpu"].available
needs_cpu_ext = pytest.mark.skipif(not CPU_OK, reason="C++ extension not built")
# FLASHQUANT_CPU_SIMD for the C++ ops: "1" the AVX2 path where the CPU has it, "0" the portable one.
CPU_PATHS = ["1", "0"]


# ---- rms_norm ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 128), (1, 1000), (4, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_rms_norm_matches_reference(dtype, shape, with_residual):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3
    weight = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    residual = torch.randn(shape, device=DEVICE, dtype=dtype) if with_residual else None
    got = fq.rms_norm(x, weight, 1e-5, residual, backend="triton")
    want_out, want_h = ref.rms_norm_ref(x, weight, 1e-5, residual)
    if with_residual:
        out, h = got
        assert torch.equal(h, x + residual), (
            "the new residual stream is x + residual, rounded as PyTorch's add"
        )
        assert_one_rounding(out, want_out, "rms_norm(x + residual)")
    else:
        assert isinstance(got, torch.Tensor)
        assert_one_rounding(got, want_out, "rms_norm")


def test_triton_rms_norm_reads_strided_rows():
    """A (rows, H) view with a row stride larger than H (e.g. a slice of a wider activation) is read in place."""
    base = torch.randn(6, 96, device=DEVICE, dtype=torch.float16)
    x = base[:, 16:80]
    weight = torch.randn(64, device=DEVICE, dtype=torch.float16)
    assert_one_rounding(
        fq.rms_norm(x, weight, backend="triton"), ref.rms_norm_ref(x, weight, 1e-5)[0], "strided"
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_layer_ops_are_close_to_the_references_and_auto_on_cpu_takes_them(dtype):
    x, r = torch.randn(3, 32, device=DEVICE, dtype=dtype), torch.randn(3, 32, device=DEVICE, dtype=dtype)
    w = (1 + 0.1 * torch.randn(32, device=DEVICE)).to(dtype)
    out, h = fq.rms_norm(x, w, 1e-6, r, backend="torch")
    want, want_h = ref.rms_norm_ref(x, w, 1e-6, r)
    assert torch.equal(h, want_h)
    assert_torch_layer_op_close(out, want, float(want.abs().max()), "rms_norm torch")
    q, k = (
        torch.randn(2, 3, 4, 16, device=DEVICE, dtype=dtype),
        torch.randn(2, 3, 2, 16, device=DEVICE, dtype=dtype),
    )
    pos, freq = torch.randint(0, 5000, (2, 3), device=DEVICE), torch.rand(8, device=DEVICE)
    q_rot, k_rot = fq.rotary_embedding(q, k, pos, freq, backend="torch")
    assert_torch_layer_op_close(q_rot, ref.rotary_ref(q, pos, freq), float(q.abs().max()), "rotary torch q")
    assert_torch_layer_op_close(k_rot, ref.rotary_ref(k, pos, freq), float(k.abs().max()), "rotary torch k")
    want = ref.silu_mul_ref(x, r)
    assert_torch_layer_op_close(fq.silu_mul(x, r, backend="torch"), want, float(want.abs().max()), "silu_mul")
    if DEVICE == "cpu":  # auto takes the C++ ops when the extension is built (below), else these
        auto = "cpu" if CPU_OK else "torch"
        assert torch.equal(fq.rms_norm(x, w, 1e-6, r)[0], fq.rms_norm(x, w, 1e-6, r, backend=auto)[0])


def test_rms_norm_errors_name_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        fq.rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="residual must have dtype"):
        fq.rms_norm(x, torch.ones(8), residual=x.half())
    with pytest.raises(ValueError, match="residual must have shape"):
        fq.rms_norm(x, torch.ones(8), residual=torch.randn(3, 8))
    with pytest.raises(ValueError, match="eps must be"):
        fq.rms_norm(x, torch.ones(8), eps=-1.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        fq.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8))
    with pytest.raises(ValueError, match="does not implement"):
        fq.rms_norm(x, torch.ones(8), backend="cuda")


# ---- rotary_embedding -------------------------------------------------------------------------------------
# (B, S, Hq, Hk, D): Llama-3 heads at decode (S = 1); MQA; Hq = Hk; D = 10 (D/2 = 5, not a power of two);
# 32/8 heads over two q head tiles of 16.
ROTARY_SHAPES = [(1, 1, 8, 2, 128), (2, 5, 6, 1, 64), (1, 3, 4, 4, 10), (2, 3, 32, 8, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,hq,hk,D", ROTARY_SHAPES)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_triton_rotary_matches_reference(dtype, B, S, hq, hk, D, pos_dtype):
    q = torch.randn(B, S, hq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, hk, D, device=DEVICE, dtype=dtype)
    positions = torch.randint(0, 100_000, (B, S), device=DEVICE, dtype=pos_dtype)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEVICE, dtype=torch.float32) / D))
    q_rot, k_rot = fq.rotary_embedding(q, k, positions, inv_freq, backend="triton")
    assert_one_rounding(q_rot, ref.rotary_ref(q, positions, inv_freq), "rotary q")
    assert_one_rounding(k_rot, ref.rotary_ref(k, positions, inv_freq), "rotary k")


def test_triton_rotary_reads_q_and_k_as_views_of_a_packed_projection():
    """q and k sliced out of one (B, S, Hq + 2 Hk, D) qkv tensor: strided heads, read in place."""
    B, S, hq, hk, D = 2, 3, 4, 2, 32
    qkv = torch.randn(B, S, hq + 2 * hk, D, device=DEVICE, dtype=torch.float16)
    q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hk]
    positions = torch.arange(S, device=DEVICE).expand(B, S)  # stride 0 over the batch
    inv_freq = torch.rand(D // 2, device=DEVICE)
    q_rot, k_rot = fq.rotary_embedding(q, k, positions, inv_freq, backend="triton")
    assert_one_rounding(q_rot, ref.rotary_ref(q, positions, inv_freq), "rotary q view")
    assert_one_rounding(k_rot, ref.rotary_ref(k, positions, inv_freq), "rotary k view")


def test_rotary_at_position_zero_is_the_identity():
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 8)
    pos = torch.zeros(1, 1, dtype=torch.long)
    for backend in ("torch", "triton") + (("cpu",) if CPU_OK else ()):
        q_rot, k_rot = fq.rotary_embedding(q, k, pos, torch.rand(4), backend=backend)
        assert torch.equal(q_rot, q) and torch.equal(k_rot, k)


def test_rotary_errors_name_the_argument():
    q, k, pos, f = (
        torch.randn(1, 2, 4, 8),
        torch.randn(1, 2, 2, 8),
        torch.zeros(1, 2, dtype=torch.long),
        torch.rand(4),
    )
    with pytest.raises(ValueError, match="must be even"):
        fq.rotary_embedding(torch.randn(1, 2, 4, 7), torch.randn(1, 2, 2, 7), pos, torch.rand(3))
    with pytest.raises(ValueError, match="k must have shape"):
        fq.rotary_embedding(q, torch.randn(1, 3, 2, 8), pos, f)
    with pytest.raises(TypeError, match="positions must have dtype"):
        fq.rotary_embedding(q, k, pos.float(), f)
    with pytest.raises(ValueError, match="inv_freq must have shape"):
        fq.rotary_embedding(q, k, pos, torch.rand(8))
    with pytest.raises(TypeError, match="k must have dtype"):
        fq.rotary_embedding(q, k.half(), pos, f)
    if DEVICE == "cpu":
        with pytest.raises(TypeError, match="bf16 is not supported by the Triton interpreter"):
            fq.rotary_embedding(q.bfloat16(), k.bfloat16(), pos, f, backend="triton")


# ---- silu_mul ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 1000), (2, 3, 1029), (1, 14336)])
def test_triton_silu_mul_matches_reference(dtype, shape):
    gate = torch.randn(shape, device=DEVICE, dtype=dtype) * 4
    up = torch.randn(shape, device=DEVICE, dtype=dtype)
    assert_one_rounding(fq.silu_mul(gate, up, backend="triton"), ref.silu_mul_ref(gate, up), "silu_mul")


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_silu_mul_of_strided_views_equals_silu_mul_of_their_copies(backend):
    """gate/up as the halves of a fused gate_up projection's output (row stride 2F: the kernel reads them in
    place), and transposed views whose leading dimensions do not flatten (copied first). Elementwise math, so
    the results must be bit-identical to those of contiguous copies."""
    gate_up = torch.randn(2, 3, 2 * 1029, device=DEVICE, dtype=torch.float16) * 3
    gate, up = gate_up.chunk(2, -1)
    rows = layer_ops._rows(gate, 1029)
    assert rows.data_ptr() == gate.data_ptr() and rows.stride() == (2 * 1029, 1)  # a view, not a copy
    for g, u in [(gate, up), (gate.transpose(0, 1), up.transpose(0, 1))]:
        out = fq.silu_mul(g, u, backend=backend)
        assert out.shape == g.shape and out.is_contiguous()
        assert torch.equal(out, fq.silu_mul(g.contiguous(), u.contiguous(), backend=backend))


def test_silu_mul_errors_name_the_argument():
    with pytest.raises(ValueError, match="up must have shape"):
        fq.silu_mul(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(TypeError, match="up must have dtype"):
        fq.silu_mul(torch.randn(2, 3), torch.randn(2, 3).half())


# ---- the C++ CPU ops (backend="cpu", auto on CPU tensors): fp32 inside, one rounding, fp32/fp16/bf16 ---------
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_cpu_ext
@pytest.mark.parametrize("simd", CPU_PATHS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 128), (1, 1000), (4, 4096), (1, 1, 2048)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cpu_rms_norm_matches_reference(monkeypatch, simd, dtype, shape, with_residual):
    """H from 1 to 4096, multiples of the 8-lane vectors and not (the tail), with and without the residual add."""
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    x = torch.randn(shape, dtype=dtype) * 3
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    residual = torch.randn(shape, dtype=dtype) if with_residual else None
    got = fq.rms_norm(x, weight, 1e-5, residual, backend="cpu")
    want_out, want_h = ref.rms_norm_ref(x, weight, 1e-5, residual)
    if with_residual:
        out, h = got
        assert torch.equal(h, want_h), "the new residual stream is x + residual, rounded as PyTorch's add"
        assert_one_rounding(out, want_out, f"rms_norm(x + residual) {dtype} {shape} simd={simd}")
    else:
        assert_one_rounding(got, want_out, f"rms_norm {dtype} {shape} simd={simd}")


@needs_cpu_ext
@pytest.mark.parametrize("simd", CPU_PATHS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("B,S,hq,hk,D", ROTARY_SHAPES + [(1, 2, 3, 1, 2), (2, 1, 32, 8, 64)])
def test_cpu_rotary_matches_reference(monkeypatch, simd, dtype, B, S, hq, hk, D):
    """D/2 of 1 and 5 (all tail), 8, 32 and 64 (whole vectors); int64 positions up to 100k."""
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    q = torch.randn(B, S, hq, D, dtype=dtype)
    k = torch.randn(B, S, hk, D, dtype=dtype)
    positions = torch.randint(0, 100_000, (B, S))
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    q_rot, k_rot = fq.rotary_embedding(q, k, positions, inv_freq, backend="cpu")
    assert_one_rounding(q_rot, ref.rotary_ref(q, positions, inv_freq), f"rotary q {dtype} simd={simd}")
    assert_one_rounding(k_rot, ref.rotary_ref(k, positions, inv_freq), f"rotary k {dtype} simd={simd}")


@needs_cpu_ext
@pytest.mark.parametrize("simd", CPU_PATHS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 1000), (2, 3, 1029), (1, 14336), (600, 40)])
def test_cpu_silu_mul_matches_reference(monkeypatch, simd, dtype, shape):
    """Gates of +-12 (sigmoid's both branches and its tails); (600, 40) is split over threads."""
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    gate = torch.randn(shape, dtype=dtype) * 4
    up = torch.randn(shape, dtype=dtype)
    assert_one_rounding(
        fq.silu_mul(gate, up, backend="cpu"), ref.silu_mul_ref(gate, up), f"silu {dtype} {simd}"
    )


@needs_cpu_ext
@pytest.mark.parametrize("simd", CPU_PATHS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_cpu_silu_mul_special_values_match_the_reference(monkeypatch, simd, dtype):
    """Large gates, infinities and NaN: NaN exactly where the reference has NaN, the rest within one rounding."""
    monkeypatch.setenv("FLASHQUANT_CPU_SIMD", simd)
    values = [
        0.0,
        -0.0,
        1e-8,
        -100.0,
        100.0,
        -80.0,
        80.0,
        float("inf"),
        float("-inf"),
        float("nan"),
        3.0,
        -3.0,
    ]
    gate = torch.tensor([values + values[:5]], dtype=dtype)  # 17 values: two vectors and a tail
    up = torch.full_like(gate, 1.5)
    got, want = fq.silu_mul(gate, up, backend="cpu"), ref.silu_mul_ref(gate, up)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert_one_rounding(got[finite], want[finite], f"silu special values {dtype} simd={simd}")


@needs_cpu_ext
def test_cpu_layer_ops_read_strided_views_in_place_or_copy_them():
    """rms_norm over rows with a stride larger than H; rotary on q / k sliced out of a packed qkv projection (strided
    heads) with positions expanded over the batch (stride 0); silu_mul on the two halves of a fused gate_up output
    and on transposed views: each bit-identical to the same op on contiguous copies."""
    base = torch.randn(6, 96, dtype=torch.bfloat16)
    x, w = base[:, 16:80], torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(fq.rms_norm(x, w, backend="cpu"), fq.rms_norm(x.contiguous(), w, backend="cpu"))
    B, S, hq, hk, D = 2, 3, 4, 2, 32
    qkv = torch.randn(B, S, hq + 2 * hk, D, dtype=torch.float16)
    q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hk]
    positions, inv_freq = torch.arange(S).expand(B, S), torch.rand(D // 2)
    got = fq.rotary_embedding(q, k, positions, inv_freq, backend="cpu")
    want = fq.rotary_embedding(
        q.contiguous(), k.contiguous(), positions.contiguous(), inv_freq, backend="cpu"
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    gate, up = (torch.randn(2, 3, 2 * 1029, dtype=torch.bfloat16) * 3).chunk(2, -1)
    for g, u in [(gate, up), (gate.transpose(0, 1), up.transpose(0, 1))]:
        out = fq.silu_mul(g, u, backend="cpu")
        assert out.shape == g.shape and out.is_contiguous()
        assert torch.equal(out, fq.silu_mul(g.contiguous(), u.contiguous(), backend="cpu"))


@needs_cpu_ext
def test_cpu_layer_ops_are_auto_on_cpu_except_with_grad():
    """auto takes the C++ ops for CPU tensors; inputs that require grad get the PyTorch path (the kernels have no
    backward), which autograd differentiates."""
    x, w = torch.randn(3, 32), torch.randn(32)
    for op in ("rms_norm", "rotary_embedding", "silu_mul"):
        assert _dispatch.resolve(op, "auto", x.device, layer_ops._auto_order(x.device)) == "cpu"
    assert torch.equal(fq.rms_norm(x, w), fq.rms_norm(x, w, backend="cpu"))
    assert torch.equal(fq.silu_mul(x, w.expand(3, 32)), fq.silu_mul(x, w.expand(3, 32), backend="cpu"))
    xg = x.clone().requires_grad_()
    fq.rms_norm(xg, w).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@needs_cpu_ext
def test_cpu_layer_op_kernels_pass_opcheck_and_check_their_inputs():
    x, w, r = (
        torch.randn(3, 16, dtype=torch.bfloat16),
        torch.randn(16),
        torch.randn(3, 16, dtype=torch.bfloat16),
    )
    torch.library.opcheck(torch.ops.flashquant.rms_norm_rows.default, (x, w, r, 1e-5))
    torch.library.opcheck(torch.ops.flashquant.rms_norm_rows.default, (x, w, None, 1e-5))
    q, k, pos = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.arange(2)[None]
    torch.library.opcheck(torch.ops.flashquant.rotary_qk.default, (q, k, pos, torch.rand(4)))
    torch.library.opcheck(torch.ops.flashquant.silu_mul_rows.default, (x, r))
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        torch.ops.flashquant.rms_norm_rows(x, w, r[:2], 1e-5)
    with pytest.raises(RuntimeError, match="unit stride along a row"):
        torch.ops.flashquant.silu_mul_rows(x.t(), r.t())
    with pytest.raises(RuntimeError, match="inv_freq must be"):
        torch.ops.flashquant.rotary_qk(q, k, pos, torch.rand(5))
    with pytest.raises(RuntimeError, match="must be fp32, fp16 or bf16"):
        torch.ops.flashquant.silu_mul_rows(x.double(), r.double())


# ---- custom ops -------------------------------------------------------------------------------------------
def test_layer_ops_are_custom_ops_that_pass_opcheck():
    x, w, r = torch.randn(3, 16), torch.randn(16), torch.randn(3, 16)
    torch.library.opcheck(torch.ops.flashquant.rms_norm.default, (x, w, r, 1e-5, "torch"))
    torch.library.opcheck(torch.ops.flashquant.rms_norm.default, (x, w, None, 1e-5, "torch"))
    q, k, pos = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.arange(2)[None]
    torch.library.opcheck(torch.ops.flashquant.rotary_embedding.default, (q, k, pos, torch.rand(4), "torch"))
    torch.library.opcheck(torch.ops.flashquant.silu_mul.default, (x, r, "torch"))


def test_layer_ops_trace_under_torch_compile_fullgraph():
    def f(x, w, r, q, k, pos, freq):
        n, h = fq.rms_norm(x, w, residual=r)
        q2, k2 = fq.rotary_embedding(q, k, pos, freq)
        return fq.silu_mul(n, h).sum() + q2.sum() + k2.sum()

    args = (
        torch.randn(3, 16),
        torch.randn(16),
        torch.randn(3, 16),
        torch.randn(1, 2, 4, 8),
        torch.randn(1, 2, 2, 8),
    )
    args += (torch.arange(2)[None], torch.rand(4))
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(*args), f(*args))
