"""Gradients: correct where an op has them, refused where it has none, never silently dropped.

quant_matmul has a backward (w.r.t. x and bias; the quantized weight is frozen) behind every backend, so a
QuantLinear can sit under a trainable adapter. The fused attention and layer kernels are forward-only: "auto"
takes their PyTorch path when the inputs require grad, and naming a forward-only backend then raises.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

import flashquant as fq
from flashquant import _dispatch
from flashquant.reference import attention as ref_attn
from flashquant.reference import quant as ref_quant
from tolerances import QMM_RTOL_CPU, assert_flash_rule

GPU = torch.cuda.is_available()
TRITON_OK = fq.backends()["triton"].available
KERNEL_DEVICE = "cuda" if GPU else "cpu"  # where the Triton kernels run (the interpreter without a GPU)


def _qmm_cases():
    """(backend, device, dtype) for every backend that runs here; bf16 is not run by the Triton interpreter."""
    cases = [(b, "cpu", d) for b in ("reference", "torch", "auto") for d in (torch.float32, torch.bfloat16)]
    cases += [("cpu", "cpu", d) for d in (torch.float32, torch.float16, torch.bfloat16)]
    tri_dtypes = (torch.float16, torch.bfloat16) if GPU else (torch.float16, torch.float32)
    cases += [("triton", KERNEL_DEVICE, d) for d in tri_dtypes]
    cases += [("cuda", "cuda", d) for d in (torch.float16, torch.bfloat16)]
    cases += [("auto", "cuda", d) for d in (torch.float16, torch.bfloat16)]
    return cases


def _skip_unless_runnable(backend: str, device: str) -> None:
    if device == "cuda" and not GPU:
        pytest.skip("needs a CUDA device")
    if backend != "auto" and not fq.backends()[backend].available:
        pytest.skip(f"backend {backend} unavailable: {fq.backends()[backend].reason}")


@pytest.mark.parametrize("backend,device,dtype", _qmm_cases())
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (8, -1, False)])
@pytest.mark.parametrize("shape", [(1, 128), (2, 5, 128)], ids=["m1", "b2s5"])
def test_quant_matmul_gradients_match_autograd_through_the_fp32_reference(
    backend, device, dtype, bits, group_size, symmetric, shape
):
    """grad_x and grad_bias of quant_matmul vs autograd through the fp32 reference, by flash-attn's rule against
    plain PyTorch (F.linear on the dequantized weight, in the same dtype); the forward under autograd is the
    named backend's, bit for bit the same as without gradients."""
    _skip_unless_runnable(backend, device)
    n = 48
    qw = fq.quantize(torch.randn(n, shape[-1], device=device).to(dtype), bits, group_size, symmetric)
    x0 = torch.randn(shape, device=device).to(dtype)
    bias0 = torch.randn(n, device=device).to(dtype)
    grad_out = torch.randn(*shape[:-1], n, device=device).to(dtype)

    x, bias = x0.clone().requires_grad_(), bias0.clone().requires_grad_()
    out = fq.quant_matmul(x, qw, bias, backend=backend)
    with torch.no_grad():
        assert torch.equal(out, fq.quant_matmul(x0, qw, bias0, backend=backend)), (
            "the forward changed under grad"
        )
    out.backward(grad_out)

    w32 = ref_quant.dequantize_ref(qw.codes(), qw.scales, qw.zeros, bits, group_size)
    x_ref, bias_ref = (t.to(torch.float32, copy=True).requires_grad_() for t in (x0, bias0))
    F.linear(x_ref, w32, bias_ref).backward(grad_out.float())
    x_pt, bias_pt = x0.clone().requires_grad_(), bias0.clone().requires_grad_()
    F.linear(x_pt, w32.to(dtype), bias_pt).backward(grad_out)

    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert bias.grad.dtype == dtype and bias.grad.shape == bias.shape
    assert_flash_rule(x.grad, x_ref.grad, x_pt.grad, f"grad_x {backend} {dtype}")
    assert_flash_rule(bias.grad, bias_ref.grad, bias_pt.grad, f"grad_bias {backend} {dtype}")


def test_quant_matmul_gives_x_its_gradient_without_a_bias_and_bias_alone_its_own():
    qw = fq.quantize(torch.randn(24, 64), 4, 32)
    x = torch.randn(3, 64, requires_grad=True)
    fq.quant_matmul(x, qw, backend="cpu").sum().backward()
    torch.testing.assert_close(x.grad, qw.dequantize(torch.float32).sum(0).expand(3, 64))
    x0, bias = torch.randn(3, 64), torch.randn(24, requires_grad=True)
    fq.quant_matmul(x0, qw, bias, backend="cpu").sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((24,), 3.0))


def test_quant_matmul_refuses_gradients_for_the_frozen_weight():
    qw = fq.quantize(torch.randn(16, 64), 4, 32)
    qw.scales.requires_grad_()
    with pytest.raises(ValueError, match=r"x and bias only.*scales require grad"):
        fq.quant_matmul(torch.randn(2, 64, requires_grad=True), qw)
    with torch.no_grad():  # no gradient will be taken: fine
        fq.quant_matmul(torch.randn(2, 64), qw)


def test_quant_matmul_custom_op_passes_opcheck_with_inputs_that_require_grad():
    """opcheck's autograd tests: the registered backward runs (eagerly and under AOT autograd)."""
    qw = fq.quantize(torch.randn(16, 64), 4, 32, symmetric=False)
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    for backend in ("torch",) + (("cpu",) if fq.backends()["cpu"].available else ()):
        torch.library.opcheck(
            torch.ops.flashquant.quant_matmul.default,
            (x, qw.qdata, qw.scales, qw.zeros, bias, 4, 32, backend),
        )


def test_quant_matmul_backward_under_torch_compile():
    """AOT autograd traces the registered backward: compiled gradients equal eager ones, with no graph break."""
    qw = fq.quantize(torch.randn(24, 64), 8, -1)
    bias0, x0 = torch.randn(24), torch.randn(4, 64)

    def loss(x, bias):
        return fq.quant_matmul(x, qw, bias).square().sum()

    grads = []
    for f in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        x, bias = x0.clone().requires_grad_(), bias0.clone().requires_grad_()
        f(x, bias).backward()
        grads.append((x.grad, bias.grad))
    torch.testing.assert_close(grads[1], grads[0])


def test_attention_and_layer_ops_backward_under_torch_compile():
    """With gradients the differentiable PyTorch paths are traced in place of the custom ops (fullgraph, no break):
    compiled gradients equal eager ones."""
    q0, k0, v0 = torch.randn(1, 5, 4, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)

    def loss(q, k, v):
        out = fq.attention(q, k, v, causal=True, softcap=3.0)
        return out.square().sum() + fq.rms_norm(q, torch.ones(16)).sum()

    grads = []
    for f in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        f(q, k, v).backward()
        grads.append((q.grad, k.grad, v.grad))
    torch.testing.assert_close(grads[1], grads[0])


def test_quant_linear_under_a_trainable_low_rank_adapter():
    """The QLoRA set-up: a frozen QuantLinear plus a trainable adapter. The adapter's and the input's gradients
    are those of the same model with the dequantized weight in a dense nn.Linear: fp32, the same math up to the
    C++ kernel's int16 activation rounding in the forward (QMM_RTOL_CPU of the largest value)."""
    torch.manual_seed(1)
    dense = torch.nn.Linear(64, 32)
    qlinear = fq.nn.QuantLinear.from_linear(dense, bits=4, group_size=32)
    dense.weight.data.copy_(qlinear.qweight.dequantize(torch.float32))
    dense.bias.data.copy_(qlinear.bias)
    dense.requires_grad_(False)
    down, up = torch.randn(4, 64) * 0.1, torch.randn(32, 4) * 0.1
    x0 = torch.randn(5, 64)

    results = []
    for base in (qlinear, dense):
        a, b = down.clone().requires_grad_(), up.clone().requires_grad_()
        x = x0.clone().requires_grad_()
        y = base(x) + (x @ a.t()) @ b.t()
        y.square().mean().backward()
        results.append((y.detach(), a.grad, b.grad, x.grad))
    for got, want, what in zip(results[0], results[1], ("y", "grad a", "grad b", "grad x")):
        tol = QMM_RTOL_CPU * float(want.abs().max())
        torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=what)


# ---- forward-only kernels ------------------------------------------------------------------------------------
def _small_attention_inputs(device, dtype):
    q = torch.randn(1, 5, 4, 16, device=device, dtype=dtype)
    k = torch.randn(1, 7, 2, 16, device=device, dtype=dtype)
    v = torch.randn(1, 7, 2, 16, device=device, dtype=dtype)
    return q, k, v


def _forward_only_calls():
    """(name, backend, call(requires_grad) -> None) for each forward-only kernel that can run here."""
    dev, dt = KERNEL_DEVICE, torch.float16

    def attention(device):
        def call(rg, backend):
            q, k, v = _small_attention_inputs(device, dt)
            fq.attention(q.requires_grad_(rg), k, v, causal=True, backend=backend)

        return call

    def attention_varlen(device):
        def call(rg, backend):
            q, k, v = (t[0] for t in _small_attention_inputs(device, dt))
            cu_q = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
            cu_k = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
            fq.attention_varlen(q, k.requires_grad_(rg), v, cu_q, cu_k, 3, 4, backend=backend)

        return call

    def kvcache(device):
        def call(rg, backend):
            q = torch.randn(2, 1, 4, 16, device=device, dtype=dt, requires_grad=rg)
            cache = torch.randn(2, 16, 2, 16, device=device, dtype=dt)
            lens = torch.tensor([3, 9], dtype=torch.int32, device=device)
            fq.attention_with_kvcache(q, cache, cache.clone(), lens, backend=backend)

        return call

    def rms_norm(rg, backend):
        x = torch.randn(3, 32, device=dev, dtype=dt)
        fq.rms_norm(x, torch.ones(32, device=dev, requires_grad=rg), backend=backend)

    def rotary(rg, backend):
        q = torch.randn(1, 3, 2, 16, device=dev, dtype=dt, requires_grad=rg)
        pos = torch.arange(3, device=dev)[None]
        fq.rotary_embedding(q, q.detach().clone(), pos, torch.rand(8, device=dev), backend=backend)

    def silu_mul(rg, backend):
        gate = torch.randn(3, 32, device=dev, dtype=dt)
        fq.silu_mul(gate, gate.clone().requires_grad_(rg), backend=backend)

    calls = [
        ("attention", "cpu", attention("cpu")),
        ("attention_varlen", "cpu", attention_varlen("cpu")),
        ("attention_with_kvcache", "cpu", kvcache("cpu")),
    ]
    calls += [
        (name, "triton", f)
        for name, f in (
            ("attention", attention(dev)),
            ("attention_varlen", attention_varlen(dev)),
            ("attention_with_kvcache", kvcache(dev)),
            ("rms_norm", rms_norm),
            ("rotary_embedding", rotary),
            ("silu_mul", silu_mul),
        )
    ]
    calls += [("attention_with_kvcache", "cuda", kvcache("cuda"))]
    return calls


@pytest.mark.parametrize(
    "op,backend,call", _forward_only_calls(), ids=[f"{o}-{b}" for o, b, _ in _forward_only_calls()]
)
def test_forward_only_backends_refuse_inputs_that_require_grad(op, backend, call):
    """A named kernel without a backward raises (naming the op, the backend and the way out) instead of
    returning an output whose gradient would silently be missing; without grad it runs."""
    _skip_unless_runnable(backend, "cuda" if backend == "cuda" else KERNEL_DEVICE)
    with pytest.raises(ValueError, match=rf"backend='{backend}' runs flashquant\.{op} forward only"):
        call(True, backend)
    call(False, backend)
    with torch.no_grad():
        call(True, backend)


def test_auto_skips_forward_only_kernels_when_inputs_require_grad(caplog):
    """Dispatch on a CUDA device (no tensor needed): Triton without gradients, PyTorch with them, said once."""
    if not TRITON_OK:
        pytest.skip("triton unavailable")
    cuda = torch.device("cuda")
    _dispatch.warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="flashquant"):
        for op in ("attention", "attention_varlen", "rms_norm", "silu_mul"):
            order = None if op.startswith("attention") else ("triton", "torch")
            assert _dispatch.resolve(op, "auto", cuda, order) == "triton"
            assert _dispatch.resolve(op, "auto", cuda, order, grad=True) == "torch"
            assert _dispatch.resolve(op, "auto", cuda, order, grad=True) == "torch"
        assert _dispatch.resolve("quant_matmul", "auto", cuda, ("triton", "torch"), grad=True) == "triton"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4 and all("require grad" in m and "forward-only" in m for m in said), said


def test_auto_attention_with_kvcache_on_cpu_gives_the_reference_gradients(caplog):
    """The C++ decode kernel is forward-only: with q, k, v requiring grad `auto` runs the PyTorch path, whose
    gradients (q, and the appended k and v) match autograd through the fp32 reference."""
    if not fq.backends()["cpu"].available:
        pytest.skip("C++ extension unavailable")
    torch.manual_seed(2)
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 16
    q0 = torch.randn(B, 2, Hq, D)
    k0, v0 = torch.randn(B, 2, Hkv, D), torch.randn(B, 2, Hkv, D)
    caches0 = torch.randn(2, B, cap, Hkv, D)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    grad_out = torch.randn(B, 2, Hq, D)

    def grads(fn):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        fn(q, caches0[0].clone(), caches0[1].clone(), k, v).backward(grad_out)
        return q.grad, k.grad, v.grad

    _dispatch.warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="flashquant"):
        got = grads(lambda q, kc, vc, k, v: fq.attention_with_kvcache(q, kc, vc, lens, k, v))
    assert any("cpu kernel is forward-only" in r.getMessage() for r in caplog.records)
    want = grads(
        lambda q, kc, vc, k, v: ref_attn.attention_kvcache_ref(
            q, kc, vc, lens, k, v, None, True, D**-0.5, (-1, -1), 0.0
        )[0]
    )
    for g, w, name in zip(got, want, "qkv"):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")


ATTN_OPTIONS = [
    dict(causal=True),
    dict(causal=False, softcap=5.0),
    dict(causal=True, return_lse=True),
    dict(causal=False, window_size=(2, 0)),
    dict(causal=True, window_size=(1, 1), softcap=3.0, return_lse=True),
]


@pytest.mark.parametrize("sq,sk", [(5, 7), (7, 5), (1, 9)])  # (7, 5) causal: the first two rows see no key
@pytest.mark.parametrize("options", ATTN_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_attention_pytorch_path_gradients_match_the_reference(sq, sk, options):
    """What `auto` runs when attention's inputs require grad (SDPA, or the explicit fp32 path for softcap / lse):
    gradients of q, k, v, through the output and the lse, equal autograd through the fp32 reference; rows with no
    visible key give zero output and finite, zero-contribution gradients."""
    q0, k0, v0 = torch.randn(2, sq, 4, 16), torch.randn(2, sk, 2, 16), torch.randn(2, sk, 2, 16)
    weights = torch.randn(2, sq, 4, 16)
    return_lse = options.get("return_lse", False)

    def grads(fn):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out, lse = fn(q, k, v)
        loss = (out * weights).sum()
        if return_lse:  # -inf for empty rows: no gradient flows from them
            loss = loss + 0.3 * torch.where(torch.isinf(lse), 0, lse).sum()
        loss.backward()
        return q.grad, k.grad, v.grad

    def ours(q, k, v):
        out = fq.attention(q, k, v, **options)
        return out if return_lse else (out, None)

    window = options.get("window_size", (-1, -1))
    got = grads(ours)
    want = grads(
        lambda q, k, v: ref_attn.attention_ref(
            q, k, v, options["causal"], None, window, options.get("softcap", 0.0)
        )
    )
    for g, w, name in zip(got, want, "qkv"):
        assert torch.isfinite(g).all(), f"grad of {name} not finite"
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_attention_gradients_on_gpu(dtype):
    """On CUDA `auto` would take the Triton kernel; with gradients it takes SDPA, whose gradients follow
    flash-attn's rule against autograd through the fp32 reference."""
    q0, k0, v0 = (t.cuda() for t in _small_attention_inputs("cpu", torch.float32))
    grad_out = torch.randn_like(q0)

    def grads(fn, dt):
        q, k, v = (t.to(dt).requires_grad_() for t in (q0, k0, v0))
        fn(q, k, v).backward(grad_out.to(dt))
        return q.grad, k.grad, v.grad

    got = grads(lambda q, k, v: fq.attention(q, k, v, causal=True), dtype)
    ref = grads(lambda q, k, v: ref_attn.attention_ref(q, k, v, True, 0.25, (-1, -1), 0.0)[0], torch.float32)
    base = grads(lambda q, k, v: fq.attention(q, k, v, causal=True, backend="torch"), dtype)
    for g, r, b in zip(got, ref, base):
        assert_flash_rule(g, r, b, f"attention grad {dtype}")


def test_llama_with_auto_backends_backpropagates_like_the_straightforward_model():
    """A whole (tiny, fp32) Llama on `auto`: with its parameters requiring grad every op takes a differentiable
    path, and the parameters' gradients match those of the independent fp64 forward in test_llama.py."""
    from flashquant.models.llama import Llama, config_from_preset
    from test_llama import straightforward_forward

    cfg = config_from_preset("tiny")
    model = Llama.random(cfg, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    weights = torch.randn(2, 6, cfg.vocab_size)
    names = [n for n, _ in model.named_parameters()]

    (model(tokens) * weights).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (straightforward_forward(model, tokens) * weights.double()).sum().backward()
    for name, g, p in zip(names, got, model.parameters()):
        tol = 1e-4 * float(p.grad.abs().max()) + 1e-7
        torch.testing.assert_close(g, p.grad, atol=tol, rtol=1e-4, msg=f"grad of {name}")
