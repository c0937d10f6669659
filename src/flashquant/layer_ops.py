"""The small ops between a decoder layer's matmuls, each one fused kernel on CUDA: :func:`rms_norm` (with the
residual add before it), :func:`rotary_embedding` (q and k in one launch) and :func:`silu_mul` (SwiGLU).

At decode sizes these ops move a few KB each, so their cost is the number of kernels: written in PyTorch ops,
one decoder layer's norms, rotary and gating take ~30 launches; fused, 4. Backends: "triton" (CUDA, or the
interpreter) and "reference" compute in fp32 and round once to the input dtype; "torch" is the PyTorch a user
would write (Hugging Face Llama's forms: the weight multiply, the rotation and the gating in the input dtype,
so up to three roundings), the baseline the fused kernels replace. "cpu" is one C++ pass per op
(csrc/cpu/layer_ops.cpp, AVX2 where the CPU has it), in fp32 rounded once like "triton": at decode sizes a public
call takes 2x (rms_norm) to 5x (rotary) less time than the ~10-15 ATen ops of "torch" (silu_mul, two ops there,
~1.1x; bench/NOTES.md, "Session 27"). "auto" takes Triton for CUDA tensors and the C++ ops for
CPU tensors (PyTorch where the extension is not built, or when the inputs require grad: the kernels are
forward-only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch
from . import reference as ref
from ._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor

_HALF = (torch.float16, torch.bfloat16)


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("triton", "torch") if device.type == "cuda" else ("cpu", "torch")


def _check_interpreter_dtype(backend: str, t: torch.Tensor) -> None:
    if backend == "triton" and t.device.type == "cpu" and t.dtype == torch.bfloat16:
        raise TypeError(
            "bf16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); use fp16/fp32 on the CPU "
            "or run on a GPU"
        )


# ---- rms_norm ---------------------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension: ``x * rsqrt(mean(x^2, -1) + eps) * weight``, in fp32, rounded once.

    Args:
        x: (..., H) fp16/bf16/fp32.
        weight: (H,) any float dtype (read as fp32).
        eps: added to the mean square, >= 0.
        residual: optional, same shape, dtype and device as x. Then ``h = x + residual`` (rounded to x.dtype,
            as PyTorch's add) is normalized, and ``(rms_norm(h), h)`` is returned: the pre-norm residual add
            of a decoder layer fused into the norm.
    Returns:
        (..., H) in x.dtype, or the pair (normalized, h) when `residual` is given.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., H), got a 0-d tensor")
    H = x.shape[-1]
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
    check_shape("weight", weight, (H,), f"(H={H},)")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,))
        check_shape("residual", residual, tuple(x.shape), "x's shape")
    device = check_same_device(x=x, weight=weight, residual=residual)
    grad = _dispatch.needs_grad(x, weight, residual)
    name = _dispatch.resolve("rms_norm", backend, device, _auto_order(device), grad=grad)
    _check_interpreter_dtype(name, x)
    x2, r2 = _rows(x, H), _rows(residual, H) if residual is not None else None
    out, h = _dispatch.call(
        "rms_norm", _rms_norm_impl, x2, weight.contiguous(), r2, float(eps), name, grad=grad
    )
    # view_as: a view(torch.Size) takes ~2.5x as long (torch 2.13's argument parsing), at every decode-step call
    out = out.view_as(x)
    return out if residual is None else (out, h.view_as(x))


def _rms_norm_impl(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .kernels.rms_norm import rms_norm_triton

        out, h = rms_norm_triton(x, weight, eps, residual)
    elif backend == "cpu":
        return torch.ops.flashquant.rms_norm_rows(x, weight, residual, eps)
    elif backend == "torch":  # Hugging Face's LlamaRMSNorm, after the residual add
        h = x + residual if residual is not None else None
        hf = (h if h is not None else x).float()
        out = weight.to(x.dtype) * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    else:
        out, h = ref.rms_norm_ref(x, weight, eps, residual)
    return out, h if h is not None else out.new_empty(0)


_rms_norm_op = torch.library.custom_op("flashquant::rms_norm", _rms_norm_impl, mutates_args=())


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, backend):
    return torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0)


# ---- rotary_embedding -------------------------------------------------------------------------------------
def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k ("rotate half": dims d and d + D/2 form a pair rotated by
    ``positions * inv_freq[d]``), in fp32, rounded once. Returns new tensors.

    Args:
        q: (B, S, Hq, D) fp16/bf16/fp32, D even.
        k: (B, S, Hk, D), same B, S, D and dtype as q.
        positions: (B, S) int32/int64, each token's position.
        inv_freq: (D/2,) float: the per-pair frequencies (e.g. Llama 3's scaled ones); read as fp32.
    Returns:
        (q_rotated, k_rotated), shapes and dtypes of q and k.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,))
    B, S, _, D = q.shape
    if D % 2:
        raise ValueError(
            f"the head dimension must be even for rotary embedding, got q of shape {tuple(q.shape)}"
        )
    check_shape("k", k, (B, S, None, D), f"(B={B}, S={S}, Hk, D={D})")
    check_tensor("positions", positions, ndim=2, dtypes=(torch.int32, torch.int64))
    check_shape("positions", positions, (B, S), f"(B={B}, S={S})")
    check_tensor("inv_freq", inv_freq, ndim=1, dtypes=FLOAT_DTYPES)
    check_shape("inv_freq", inv_freq, (D // 2,), f"(D/2={D // 2},)")
    device = check_same_device(q=q, k=k, positions=positions, inv_freq=inv_freq)
    grad = _dispatch.needs_grad(q, k, inv_freq)
    name = _dispatch.resolve("rotary_embedding", backend, device, _auto_order(device), grad=grad)
    _check_interpreter_dtype(name, q)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out, k_out = _dispatch.call(
        "rotary_embedding", _rotary_impl, q, k, positions, inv_freq.float().contiguous(), name, grad=grad
    )
    return q_out, k_out


def _rotary_impl(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .kernels.rotary import rotary_triton

        return rotary_triton(q, k, positions, inv_freq)
    if backend == "cpu":
        return torch.ops.flashquant.rotary_qk(q, k, positions, inv_freq)
    if (
        backend == "torch"
    ):  # Hugging Face's apply_rotary_pos_emb: cos/sin once for q and k, rotation in the dtype
        angles = positions[..., None].float() * inv_freq
        emb = torch.cat([angles, angles], -1)[:, :, None]  # (B, S, 1, D)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

        def rotate(x):
            x1, x2 = x.chunk(2, -1)
            return x * cos + torch.cat([-x2, x1], -1) * sin

        return rotate(q), rotate(k)
    return ref.rotary_ref(q, positions, inv_freq), ref.rotary_ref(k, positions, inv_freq)


_rotary_op = torch.library.custom_op("flashquant::rotary_embedding", _rotary_impl, mutates_args=())


@_rotary_op.register_fake
def _(q, k, positions, inv_freq, backend):
    return torch.empty_like(q), torch.empty_like(k)


# ---- silu_mul ---------------------------------------------------------------------------------------------
def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """SwiGLU's gating ``silu(gate) * up``, in fp32, rounded once.

    Args:
        gate, up: same shape and dtype (fp16/bf16/fp32), e.g. (B, S, intermediate_size); they may be strided
            views such as the two halves of a fused projection's output, ``gate_up.chunk(2, -1)`` (read in
            place on the Triton path).
    Returns:
        a new contiguous tensor of gate's shape and dtype.
    """
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=(gate.dtype,))
    check_shape("up", up, tuple(gate.shape), "gate's shape")
    device = check_same_device(gate=gate, up=up)
    grad = _dispatch.needs_grad(gate, up)
    name = _dispatch.resolve("silu_mul", backend, device, _auto_order(device), grad=grad)
    _check_interpreter_dtype(name, gate)
    n_cols = gate.shape[-1] if gate.dim() else 1
    out = _dispatch.call("silu_mul", _silu_mul_impl, _rows(gate, n_cols), _rows(up, n_cols), name, grad=grad)
    return out.view_as(gate)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., F) -> (rows, F) with stride 1 along F: a view where the leading dimensions flatten into one stride
    (e.g. a half of ``gate_up.chunk(2, -1)``), else a contiguous copy."""
    t2 = t.reshape(t.numel() // n_cols if n_cols else 0, n_cols)
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()


def _silu_mul_impl(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .kernels.silu_mul import silu_mul_triton

        return silu_mul_triton(gate, up)
    if backend == "cpu":
        return torch.ops.flashquant.silu_mul_rows(gate, up)
    if backend == "torch":
        return F.silu(gate) * up
    return ref.silu_mul_ref(gate, up)


_silu_mul_op = torch.library.custom_op("flashquant::silu_mul", _silu_mul_impl, mutates_args=())


@_silu_mul_op.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)
