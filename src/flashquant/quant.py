"""Weight-only int4/int8 quantization: :func:`quantize`, :class:`QuantizedWeight`, :func:`quant_matmul`."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _dispatch, _ext
from ._checks import FLOAT_DTYPES, check_tensor
from .kernels import min_group_size
from .reference import quant as ref

__all__ = ["QuantizedWeight", "quantize", "quant_matmul", "pack", "unpack"]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K) -> packed uint8: (N, K) for 8 bits, (N, K // 2) for 4 bits (k = 2j in the low
    nibble of byte j, k = 2j + 1 in the high nibble; viewed as int32 that is eight codes per word, k = 8i + t
    in bits 4t..4t+3, little-endian)."""
    if bits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack(qdata: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: packed uint8 -> codes uint8 (N, K)."""
    if bits == 8:
        return qdata
    return torch.stack((qdata & 0xF, qdata >> 4), dim=-1).reshape(qdata.shape[0], -1)


class QuantizedWeight:
    """A weight (N = out_features, K = in_features) quantized by :func:`quantize`.

    Attributes:
        qdata:  uint8. bits=8: (N, K), one code per byte. bits=4: (N, K // 2), two codes per byte,
                k = 2j in the low nibble of byte j, k = 2j + 1 in the high nibble (see :func:`pack`).
                Codes are unsigned (offset-binary): code in [0, 2^bits).
        scales: (N, K // group_size), dtype of the original weight (fp16/bf16/fp32).
        zeros:  uint8 (N, K // group_size) zero points, or None for symmetric quantization, where the
                zero point is 2^(bits-1) (8 for int4, 128 for int8).
        bits, group_size (-1 = one group per output channel), shape (N, K), dtype (the original weight's).
    Dequantized weight: ``(code - zero) * scale``; the exact rounding rules are in
    :mod:`flashquant.reference.quant`. Row-major along K, so a GEMV reads each row of codes contiguously.
    """

    def __init__(self, qdata, scales, zeros, bits: int, group_size: int, shape, dtype):
        self.qdata, self.scales, self.zeros = qdata, scales, zeros
        self.bits, self.group_size = int(bits), int(group_size)
        self.shape, self.dtype = torch.Size(shape), dtype

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def effective_group_size(self) -> int:
        return self.shape[1] if self.group_size == -1 else self.group_size

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        """Bytes a matmul must read: codes + scales (+ zeros)."""
        z = 0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size()
        return self.qdata.numel() + self.scales.numel() * self.scales.element_size() + z

    def codes(self) -> torch.Tensor:
        return unpack(self.qdata, self.bits)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, K) dense weight in `dtype` (default: the original dtype), ``(code - zero) * scale`` in fp32 rounded
        once to `dtype`: one pass of the C++ extension on CPUs, of the Triton kernel on CUDA (bit for bit the same
        values)."""
        args = (
            self.qdata,
            self.scales,
            self.zeros,
            self.bits,
            self.effective_group_size,
            dtype or self.dtype,
        )
        return _dispatch.call("dequantize", _dequantize_impl, *args)

    def to(self, device) -> QuantizedWeight:
        z = None if self.zeros is None else self.zeros.to(device)
        return QuantizedWeight(
            self.qdata.to(device),
            self.scales.to(device),
            z,
            self.bits,
            self.group_size,
            self.shape,
            self.dtype,
        )

    def __repr__(self) -> str:
        sym = "symmetric" if self.zeros is None else "asymmetric"
        return (
            f"QuantizedWeight(shape={tuple(self.shape)}, bits={self.bits}, group_size={self.group_size}, "
            f"{sym}, dtype={self.dtype}, device={self.device})"
        )


def _dequantize_impl(
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The (N, K) dense weight in `dtype` (group_size: the effective one, K for per-channel), in one pass: the C++
    extension on CPUs, the Triton kernel on CUDA, the reference's fp32 math otherwise. All three round
    ``(code - zero) * scale`` once, so they agree bit for bit."""
    device = qdata.device.type
    if dtype in FLOAT_DTYPES and device == "cpu" and _dispatch._available("cpu"):
        return torch.ops.flashquant.dequantize_packed(qdata, scales, zeros, bits, group_size, dtype)
    if dtype in FLOAT_DTYPES and device == "cuda" and _dispatch._available("triton"):
        from .kernels.dequantize import dequantize_triton

        return dequantize_triton(qdata, scales, zeros, bits, group_size, dtype)
    return ref.dequantize_ref(unpack(qdata, bits), scales, zeros, bits, group_size).to(dtype)


# A custom op so that traced code (torch.compile, and quant_matmul's backward under AOT autograd) records one node
# instead of launching the kernels on fake tensors.
_dequantize_op = torch.library.custom_op("flashquant::dequantize", _dequantize_impl, mutates_args=())


@_dequantize_op.register_fake
def _(qdata, scales, zeros, bits, group_size, dtype):
    return qdata.new_empty((qdata.shape[0], qdata.shape[1] * (8 // bits)), dtype=dtype)


QUANTIZE_METHODS = ("minmax", "mse", "gptq")


def check_quantize_method(method: str) -> None:
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"method must be one of {QUANTIZE_METHODS}, got {method!r}")


def quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    *,
    method: str = "minmax",
    hessian: torch.Tensor | None = None,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize a weight w (out_features N, in_features K), fp16/bf16/fp32, to int4 or int8.

    group_size: 32, 64, 128, 256, ... (must divide K) or -1 for one scale per output channel.
    int4 needs an even K (two codes per byte). Returns a :class:`QuantizedWeight` on w's device.

    method: how each group's range is chosen (the stored format and the kernels are the same for both):
        * ``"minmax"``: the group's full range; one pass.
        * ``"mse"``: the range shrunk by the clip ratio (1.0 down to 0.2) whose quantized group is closest to w in
          squared error; outliers clamp, the rest gets a finer grid. No group gets worse than min-max.
          Weight SQNR gains on random weights (``python -m flashquant.bench.accuracy``): int4 symmetric
          +1.1-1.3 dB at group 128, +2-4.5 dB per channel (more for long rows, heavy tails); asymmetric less;
          int8 < 0.2 dB. Costs 33 trial quantizations per group (on CPUs in C++, each group read once: ~0.2 s
          per 4096 x 4096 matrix on 2 cores).
        * ``"gptq"``: GPTQ (flashquant.gptq) with `hessian` = X^T X, (K, K) float, of the layer's calibration
          inputs X (any positive multiple; ``quantize_model(calibration=...)`` collects it): columns are quantized
          in turn, each one's error moved onto the columns after it, so that the layer's output error on inputs
          like X is small; group grids by the "mse" search. An O(N K^2 + K^3) computation.
          ``act_order=True``: columns by decreasing diagonal of `hessian` (the busiest input channels first), with
          every group's grid fixed beforehand from w (the format stores no column order).
    """
    check_tensor("w", w, ndim=2, dtypes=FLOAT_DTYPES)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    check_quantize_method(method)
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be a bool, got {type(act_order).__name__}")
    if method == "gptq":
        if hessian is None:
            raise ValueError("method='gptq' needs hessian=X^T X (K, K) of the layer's calibration inputs")
        check_tensor("hessian", hessian, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
        if hessian.shape != (w.shape[1], w.shape[1]):
            raise ValueError(
                f"hessian must have shape (K, K) = {(w.shape[1], w.shape[1])} for w of shape {tuple(w.shape)},"
                f" got {tuple(hessian.shape)}"
            )
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError("hessian contains inf or NaN")
    elif hessian is not None or act_order:
        what = "hessian" if hessian is not None else "act_order=True"
        raise ValueError(f"{what} is used by method='gptq' only, got method={method!r}")
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"group_size must be a positive int or -1 (per output channel), got {group_size!r}")
    N, K = w.shape
    if group_size != -1 and K % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must divide in_features K={K} (w has shape {tuple(w.shape)})"
        )
    if bits == 4 and K % 2 != 0:
        raise ValueError(f"int4 packs two codes per byte, so in_features K must be even, got K={K}")
    # Rows are quantized independently, so a chunk of rows at a time gives the same bits as the whole matrix at
    # once, without its fp32 temporaries: on CPUs those were several fresh buffers of 4 x N x K bytes each (1 GB for
    # a 128256 x 2048 lm_head), whose page faults cost more than the arithmetic (bench/NOTES.md, "Session 19").
    # GPTQ's rows are independent too, but its column loop costs the same for any number of rows: all at once.
    rows = N if method == "gptq" else max(1, _QUANTIZE_CHUNK_ELEMENTS[w.device.type == "cuda"] // max(K, 1))
    gs = K if group_size == -1 else group_size
    qdata = torch.empty(N, K * bits // 8, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, K // gs if K else 0, dtype=w.dtype, device=w.device)
    zeros = None if symmetric else torch.empty(scales.shape, dtype=torch.uint8, device=w.device)
    for n0 in range(0, N, rows):
        chunk = w[n0 : n0 + rows]
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError("w contains inf or NaN; quantization needs finite weights")
        if K == 0:
            continue
        if method == "gptq":
            from .gptq import gptq_quantize

            chunk_elements = _QUANTIZE_CHUNK_ELEMENTS[w.device.type == "cuda"]
            codes, s, z = gptq_quantize(
                chunk,
                hessian,
                bits,
                group_size,
                symmetric,
                chunk_elements=chunk_elements,
                act_order=act_order,
            )
        else:
            clip = mse_clip_ratios(chunk, bits, group_size, symmetric) if method == "mse" else 1.0
            codes, s, z = ref.quantize_ref(chunk, bits, group_size, symmetric, clip)
        qdata[n0 : n0 + rows] = pack(codes, bits)
        scales[n0 : n0 + rows] = s
        if zeros is not None:
            zeros[n0 : n0 + rows] = z
    return QuantizedWeight(qdata, scales, zeros, bits, group_size, w.shape, w.dtype)


def mse_clip_ratios(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """The "mse" clip search: per group of w (N, K), the ratio of reference.quant.CLIP_RATIOS whose quantized group
    is closest to w, fp32 (N, K // group_size); reference.quant.mse_clip_ratios defines it. On CPUs the C++ kernel
    (csrc/cpu/mse_clip.cpp: the same choices, each group read once instead of once per ratio; 16-20x faster, which
    makes quantize(method="mse") ~10x faster: bench/NOTES.md "Session 22"); elsewhere the reference (33 passes of
    torch ops, fast on a GPU)."""
    if w.device.type == "cpu":
        loaded, why = _ext.cpu_ext()
        if loaded:
            return torch.ops.flashquant.mse_clip_search(w, bits, group_size, symmetric, list(ref.CLIP_RATIOS))
        _dispatch.warn_once(
            f"flashquant.quantize(method='mse'): {why}; the clip search runs as torch ops instead, 16-20x slower"
        )
    return ref.mse_clip_ratios(w, bits, group_size, symmetric)


# Elements of w quantized at a time (CPU, CUDA): on CPUs 4 MB of fp32 temporaries per step, L2/L3-sized; on GPUs
# larger chunks, as the point there is only to bound the temporaries (256 MB each), not to stay in cache.
_QUANTIZE_CHUNK_ELEMENTS = (1 << 20, 1 << 26)


def _cuda_takes(m: int, k: int, effective_group_size: int, dtype: torch.dtype) -> bool:
    return (
        1 <= m <= 16
        and k % 32 == 0
        and effective_group_size % 32 == 0
        and dtype in (torch.float16, torch.bfloat16)
    )


def cuda_supports(x2: torch.Tensor, qweight: QuantizedWeight) -> bool:
    """The CUDA GEMV handles decode-sized M with K and group_size multiples of 32, fp16/bf16."""
    return _cuda_takes(x2.shape[0], qweight.in_features, qweight.effective_group_size, x2.dtype)


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch's bf16 matmuls use them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def cpu_kernel_level() -> str | None:
    """The C++ CPU kernel's instruction-set path now ("amx_bf16", "avx512_vnni", "avx_vnni", "avx2", "scalar"), or None
    without the extension. FLASHQUANT_CPU_SIMD caps it and is read on every call."""
    if not _dispatch._available("cpu"):
        return None
    return torch.ops.flashquant.cpu_simd_level()


# backend="cpu" at prefill-sized M: from this many activation rows on, the weight is dequantized (C++,
# csrc/cpu/dequantize.cpp) in row chunks and multiplied by torch's BLAS (oneDNN / MKL; bf16 on AMX tiles) instead
# of the fused kernel, which decodes each weight again for every block of activation rows and cannot match the
# BLAS's GEMM once the matmul is compute-bound. Measured by `python -m flashquant.bench --preset crossover`
# (rows "cpu-fused" / "cpu-dequant" / "cpu-dequant_fp32"; bench/NOTES.md, "Session 15" and "Session 24"):
# 4096x4096 on the AMX Xeon, commit e10a9fc, median ms fused / dequant, int4 (int8 alike):
# * fp32 with the AVX-512 VNNI kernel: M = 64 11.4 / 11.5, M = 128 20.0 / 16.4: from 128.
# * fp32 on AVX2 CPUs: M = 128 49.0 / 49.5 (int4), 42.3 / 46.3 (int8); M = 256 92.9 / 80.1, 81.9 / 67.3: from 256
#   (the 2-core AMD EPYC, run at commit 2a1eef8: bench/results/amd-epyc-x2/crossover.json as committed in 11d33d5;
#   the next run, the file now, agrees at 256: 69.4 / 56.7 int4). AVX-VNNI CPUs assumed alike.
# * bf16 on AMX CPUs: M = 256 7.3 / 6.8 (within noise; the fused AMX path is exact to 1 bf16 ulp, the dequantize
#   strategy rounds each weight to bf16 first, so the tie stays fused), M = 512 15.6 / 9.7: from 512.
# * fp16 on the same CPUs (torch's fp16 GEMM there runs at its fp32 speed): M = 64 10.1 / 10.7, M = 128 19.3 / 15.9:
#   from 128.
# * fp16 / bf16 on CPUs without AMX: the BLAS there has no fast half-precision GEMM (bf16 F.linear at M = 1024 took
#   1.65 s on the AMD machine, fp32 0.24 s), so "dequant" in the activations' dtype never wins (4.7x slower than
#   the fused kernel at M = 1024). "dequant_fp32" instead widens x, dequantizes to fp32 and runs the fp32 GEMM,
#   rounding the output once to x's dtype. The fused kernel's time does not depend on the activations' dtype, so
#   it crosses where fp32 does: AMD machine, bf16 int4 fused / dequant_fp32 (the file now, commit 11d33d5) M = 128
#   38.3 / 35.9, 256 76.5 / 74.3, 512 182 / 126, 1024 371 / 282; fp16 alike.
CPU_DEQUANT_MIN_M_FP32_AVX512 = 128
CPU_DEQUANT_MIN_M_FP32_AVX2 = 256
CPU_DEQUANT_MIN_M_AMX = {torch.bfloat16: 512, torch.float16: 128}
_CPU_DEQUANT_MIN_M_ANY = min(
    CPU_DEQUANT_MIN_M_FP32_AVX512, CPU_DEQUANT_MIN_M_FP32_AVX2, *CPU_DEQUANT_MIN_M_AMX.values()
)
# Weights are dequantized this many elements at a time (8 MB in bf16) into one per-thread buffer kept between calls
# (csrc/cpu/dequantize.cpp), so a 128256 x 4096 lm_head needs no 1 GB temporary and no call pays page faults for a
# fresh buffer (a new 32 MB tensor costs ~7 ms of them on the AMX Xeon; chunks of 1024 rows of K = 4096 ran as fast
# as the whole weight at once; ad-hoc, bench/NOTES.md, "Session 15").
CPU_DEQUANT_CHUNK_ELEMENTS = 1 << 22


def cpu_dequant_min_m(dtype: torch.dtype) -> int | None:
    """The M from which backend="cpu" dequantizes and calls BLAS (cpu_dequant_strategy) instead of the fused
    kernel (None: never); int4 and int8 crossed at the same M in every measurement."""
    if dtype == torch.float32 or not cpu_has_amx():
        level = cpu_kernel_level()
        return (
            CPU_DEQUANT_MIN_M_FP32_AVX512
            if level in ("avx512_vnni", "amx_bf16")
            else CPU_DEQUANT_MIN_M_FP32_AVX2
        )
    return CPU_DEQUANT_MIN_M_AMX.get(dtype)


def cpu_dequant_strategy(dtype: torch.dtype) -> str:
    """Which dequantize + BLAS strategy backend="cpu" runs from cpu_dequant_min_m on: the GEMM in x's dtype where the
    CPU has a fast one for it (fp32; fp16 / bf16 on AMX CPUs), else in fp32 ("dequant_fp32")."""
    return "dequant" if dtype == torch.float32 or cpu_has_amx() else "dequant_fp32"


def quant_matmul_cpu(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    strategy: str | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """backend="cpu": x (M, K) @ dequant(W)^T (+ bias (N,)) in x.dtype. strategy "fused" (the C++ kernel: VNNI, or
    AMX tiles for bf16; the bias added to its fp32 sums), "dequant" (C++ dequantize in row chunks + torch.addmm, the
    weight and the bias rounded to x.dtype first as dequantize() + F.linear does), "dequant_fp32" (the same in
    fp32 from x widened, the output rounded once to x.dtype: for CPUs whose BLAS has no fast half-precision GEMM)
    or None: cpu_dequant_strategy(x.dtype) from cpu_dequant_min_m(x.dtype) rows on, else "fused"."""
    if strategy is None:
        # decode-sized M never reaches a switch: skip the lookup (it calls an op) on the per-token path
        min_m = cpu_dequant_min_m(x.dtype) if x.shape[0] >= _CPU_DEQUANT_MIN_M_ANY else None
        use_blas = min_m is not None and x.shape[0] >= min_m
        strategy = cpu_dequant_strategy(x.dtype) if use_blas else "fused"
    if strategy == "fused":
        return torch.ops.flashquant.quant_matmul_packed(x, qdata, scales, zeros, bits, group_size, bias)
    if strategy not in ("dequant", "dequant_fp32"):
        raise ValueError(f"strategy must be 'fused', 'dequant', 'dequant_fp32' or None, got {strategy!r}")
    widen = strategy == "dequant_fp32" and x.dtype != torch.float32
    xs, bs = (x.float(), None if bias is None else bias.float()) if widen else (x, bias)
    out = torch.ops.flashquant.dequant_matmul_packed(
        xs, qdata, scales, zeros, bits, group_size, CPU_DEQUANT_CHUNK_ELEMENTS, bs
    )
    return out.to(x.dtype) if widen else out


def triton_supports(qweight: QuantizedWeight) -> bool:
    """Whether the Triton kernel takes this weight's group size (see kernels.min_group_size)."""
    return _triton_takes(qweight.bits, qweight.group_size)


def _triton_takes(bits: int, group_size: int) -> bool:
    return group_size == -1 or group_size % min_group_size(bits) == 0


def _auto_order(
    device: torch.device, m: int, cuda_ok: bool = True, triton_ok: bool = True
) -> tuple[str, ...]:
    if device.type == "cuda":
        # M <= 16 tries the CUDA tensor-core GEMV first. On an H100 (graph replays, bench/NOTES.md) it beat the
        # Triton kernel at every M <= 16 in bf16 (4096 x 4096: int4 0.017-0.020 vs 0.025-0.027 ms, int8 0.017-0.019
        # vs 0.030-0.032) and in fp16 for int4 at M = 1 (0.022 vs 0.033 ms at 14336 x 4096); fp16 M = 16 tied.
        # Eager, it also skips Triton's Python launch path. From M = 512 (int4) / 128 (int8) the Triton backend
        # dequantizes once and calls cuBLAS (kernels/quant_matmul.py).
        order = ("cuda", "triton", "torch") if m <= 16 and cuda_ok else ("triton", "torch")
        return order if triton_ok else tuple(b for b in order if b != "triton")
    return _CPU_AUTO_ORDER


# backend "cpu" switches to dequantize + BLAS by itself at prefill sizes (quant_matmul_cpu), so it wins at every M
_CPU_AUTO_ORDER = ("cpu", "torch")


def quant_matmul(
    x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """``F.linear(x, qweight.dequantize(), bias)``, computed by a fused dequant-matmul kernel.

    x: (..., K) fp16/bf16/fp32, on qweight's device. bias: (N,) or None, added by the kernels to their fp32 sums
    before the output's one rounding (no second pass; where a backend dequantizes and calls the BLAS, in x.dtype as
    F.linear takes it). Returns (..., N) in x.dtype (accumulation in fp32).
    backend: "auto", "reference", "torch" (dequantize + F.linear), "triton", "cuda" (1 <= M <= 16) or "cpu"
    (C++ kernel, AVX2 / AVX-VNNI / AVX-512 VNNI: it rounds activations to int16 per group, a relative error of
    2^-16 of the group's max, below the rounding of fp16/bf16 inputs; on CPUs with AMX, bf16 activations with
    M >= 8 and group sizes that are multiples of 32 run on AMX tiles instead, exact up to fp32 summation; from
    cpu_dequant_min_m(x.dtype) rows on, prefill sizes, it dequantizes the weight to x.dtype in C++ and calls
    torch's BLAS, rounding each weight to x.dtype first as dequantize() + F.linear does; fp16/bf16 on CPUs
    without AMX, whose BLAS has no fast half-precision GEMM, do this in fp32 and round the output once).
    Differentiable with respect to x and bias on every backend (the quantized weight is frozen): the backward
    computes ``grad_out @ qweight.dequantize(x.dtype)``.
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(
            f"qweight must be a flashquant.QuantizedWeight (from flashquant.quantize), "
            f"got {type(qweight).__name__}"
        )
    return quant_matmul_parts(
        x,
        qweight.qdata,
        qweight.scales,
        qweight.zeros,
        qweight.bits,
        qweight.group_size,
        qweight.shape,
        bias,
        backend,
    )


def quant_matmul_parts(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """:func:`quant_matmul` on a weight given by the fields of a :class:`QuantizedWeight` (shape: its (N, K)), with
    the same checks: QuantLinear.forward calls it, so a layer call builds no QuantizedWeight. It runs once per linear
    per token, so it is written for few Python steps: in an eager decode step the interpreter runs between kernels
    that evict its code and data from the caches, where each step costs several times what it costs warm
    (bench/NOTES.md, "Session 28" and "Session 29")."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    N, K = shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., K={K}) to match qweight {(N, K)}, got {tuple(x.shape)}")
    device = x.device
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape (N={N},), got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"x is on {device} but bias is on {bias.device}; move them to one device")
    if qdata.device != device:
        raise ValueError(f"x is on {device} but qweight is on {qdata.device}; move them to one device")
    grad = _dispatch.needs_grad(x, bias)
    if grad and scales.requires_grad:  # (qdata and zeros are uint8: they cannot require grad)
        raise ValueError(
            "quant_matmul has gradients for x and bias only; qweight.scales require grad here (the quantized "
            "weight is frozen: detach its scales, or train a separate adapter next to it)"
        )
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    effective_group = K if group_size == -1 else group_size
    if device.type == "cuda":
        cuda_ok, triton_ok = _cuda_takes(M, K, effective_group, x.dtype), _triton_takes(bits, group_size)
        order = _auto_order(device, M, cuda_ok, triton_ok)
    else:  # the per-token path on CPUs: the CUDA checks do not apply
        cuda_ok, triton_ok = False, True
        order = _CPU_AUTO_ORDER
    name = _dispatch.resolve("quant_matmul", backend, device, order, grad=grad)
    if name == "torch" and backend == "auto" and not triton_ok:
        _dispatch.warn_once(
            f"flashquant.quant_matmul: no kernel takes int{bits} group_size={group_size} at "
            f"M={M} on CUDA (the Triton kernel's group sizes are listed in flashquant.quant."
            "triton_supports); using the slow dequantize + F.linear path"
        )
    if name == "cuda" and not cuda_ok:
        raise ValueError(
            f"backend='cuda' quant_matmul needs 1 <= M <= 16, K and group_size multiples of 32 and "
            f"fp16/bf16 x; got M={M}, K={K}, group_size={group_size}, {x.dtype}"
        )
    out = _dispatch.call(
        "quant_matmul",
        _quant_matmul_impl,
        x2,
        qdata,
        scales,
        zeros,
        bias,
        bits,
        effective_group,
        name,
        grad=grad,
    )
    return out if x2 is x else out.view(*x.shape[:-1], N)  # (unpacked: a view(torch.Size) parses slower)


# ---- the custom op (so torch.compile traces through it) ---------------------------------------------------
def _quant_matmul_impl(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    backend: str,
) -> torch.Tensor:
    if backend == "reference":
        return ref.quant_matmul_ref(x, unpack(qdata, bits), scales, zeros, bits, group_size, bias)
    if backend == "torch":
        w = ref.dequantize_ref(unpack(qdata, bits), scales, zeros, bits, group_size).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    # The kernels add the bias to their fp32 sums where they write the output: one rounding, no second pass.
    if backend == "triton":
        from .kernels.quant_matmul import quant_matmul_triton

        return quant_matmul_triton(x, qdata, scales, zeros, bits, group_size, bias)
    if backend == "cpu":
        return quant_matmul_cpu(x, qdata, scales, zeros, bits, group_size, bias=bias)
    if backend == "cuda":
        return torch.ops.flashquant.quant_matmul_packed(x, qdata, scales, zeros, bits, group_size, bias)
    raise ValueError(f"unknown backend {backend!r}")


_quant_matmul_op = torch.library.custom_op("flashquant::quant_matmul", _quant_matmul_impl, mutates_args=())


@_quant_matmul_op.register_fake
def _(x, qdata, scales, zeros, bias, bits, group_size, backend):
    return x.new_empty((x.shape[0], qdata.shape[0]))


# ---- its backward: the weight is frozen, so only x and bias get gradients ----------------------------------
def _quant_matmul_setup_context(ctx, inputs, output):
    x, qdata, scales, zeros, bias, bits, group_size, backend = inputs
    ctx.save_for_backward(qdata, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _quant_matmul_backward(ctx, grad_out):
    """out = x @ W^T + bias, so grad_x = grad_out @ W and grad_bias = grad_out summed over rows. W is dequantized
    once into grad_out's dtype (x's), in one kernel: the (N, K) temporary that a dense layer would hold anyway, and
    the matmul is then the BLAS's, as in the unquantized layer's backward."""
    qdata, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.flashquant.dequantize(qdata, scales, zeros, ctx.bits, ctx.group_size, grad_out.dtype)
        grad_x = grad_out @ w
    if ctx.needs_input_grad[4]:
        grad_bias = grad_out.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None, None


_quant_matmul_op.register_autograd(_quant_matmul_backward, setup_context=_quant_matmul_setup_context)
