"""Benchmark cases: every flashquant implementation paired with what a user would run instead (the anchors),
measured in the same run. An implementation that cannot run here is kept with its reason, never dropped."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

import flashquant as fq
from flashquant import _dispatch

from .harness import cache_bytes, copies_for


@dataclasses.dataclass
class Case:
    op: str  # "quant_matmul" | "prefill" | "decode" | "varlen"
    group: str  # cases in one group are compared with each other (same shape)
    impl: str
    anchor: bool  # True for the baselines users would otherwise use
    shape: dict
    dtype: str
    bytes: int  # bytes that must move: weights/KV read once, activations, outputs
    flops: int
    make: Callable[[], tuple[Callable, list]]  # builds (fn, rotated input sets); called only when run
    unavailable: str | None = None


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _why_not(backend: str, device: str) -> str | None:
    """None if flashquant's `backend` can run on `device` on this machine, else the reason."""
    info = fq.backends()[backend]
    if not info.available:
        return info.reason
    if backend == "cuda" and device != "cuda":
        return "needs a CUDA device"
    if backend == "triton" and device != "cuda" and not _dispatch.triton_interpret():
        return "needs a CUDA device (or the Triton interpreter, TRITON_INTERPRET=1)"
    return None


# ---- quantized matmul --------------------------------------------------------------------------------------
def _rotated(device, make_one: Callable[[], tuple], bytes_per_copy: int) -> list[tuple]:
    n = copies_for(
        bytes_per_copy, cache_bytes(device), max_total=(6 << 30) if device == "cuda" else (3 << 29)
    )
    return [make_one() for _ in range(n)]


@contextlib.contextmanager
def _cpu_simd_cap(level: str | None):
    """FLASHQUANT_CPU_SIMD (the C++ kernels' instruction-set cap) set to `level`, or unset for None, inside the
    block; restored after."""
    saved = os.environ.get("FLASHQUANT_CPU_SIMD")
    if level is None:
        os.environ.pop("FLASHQUANT_CPU_SIMD", None)
    else:
        os.environ["FLASHQUANT_CPU_SIMD"] = level
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FLASHQUANT_CPU_SIMD", None)
        else:
            os.environ["FLASHQUANT_CPU_SIMD"] = saved


def _cpu_best_simd() -> str | None:
    """The C++ CPU kernels' best SIMD path on this machine (None without the extension)."""
    if not fq.backends()["cpu"].available:
        return None
    with _cpu_simd_cap(None):
        return torch.ops.flashquant.cpu_simd_level()


def _cpu_simd_narrower() -> list[str]:
    """The C++ CPU kernels' SIMD paths this machine runs below its best one (none without the extension)."""
    if not fq.backends()["cpu"].available:
        return []
    runs = []
    for level in ("avx2", "avx_vnni", "avx512_vnni", "amx_bf16"):
        with _cpu_simd_cap(level):
            if torch.ops.flashquant.cpu_simd_level() == level:
                runs.append(level)
    return runs[:-1]


def _qmm_flashquant(device, n, k, m, bits, group, backend, dtype, strategy=None, cpu_simd=None):
    """flashquant.quant_matmul with `backend`; with `strategy` ("fused" / "dequant") that backend's launcher
    instead (Triton's or the CPU's), forced to that strategy (the crossover preset times both around
    DEQUANT_GEMM_MIN_M[bits] / cpu_dequant_min_m); with `cpu_simd`
    (e.g. "avx2") the C++ kernel capped at that instruction set (FLASHQUANT_CPU_SIMD), to compare its paths in
    one run."""

    def run(x, qw):
        if cpu_simd is not None:
            with _cpu_simd_cap(cpu_simd):  # costs a few us of the timed call: <1% of a 0.5 ms GEMV
                return fq.quant_matmul(x, qw, backend=backend)
        if strategy is None:
            return fq.quant_matmul(x, qw, backend=backend)
        args = (x, qw.qdata, qw.scales, qw.zeros, bits, qw.effective_group_size)
        if backend == "cpu":
            return fq.quant.quant_matmul_cpu(*args, strategy=strategy)
        from flashquant.kernels.quant_matmul import quant_matmul_triton

        return quant_matmul_triton(*args, strategy=strategy)

    def make():
        w = torch.randn(n, k, device=device, dtype=dtype)
        x = torch.randn(m, k, device=device, dtype=dtype)
        qw0 = fq.quantize(w, bits, group)
        inputs = _rotated(
            device,
            lambda: (
                x,
                fq.QuantizedWeight(
                    qw0.qdata.clone(), qw0.scales.clone(), None, bits, group, qw0.shape, dtype
                ),
            ),
            qw0.nbytes,
        )
        return run, inputs

    nbytes = (
        n * k * bits // 8 + n * (k // (k if group == -1 else group)) * 2 + (m * k + m * n) * dtype.itemsize
    )
    gname = "per-channel" if group == -1 else f"g{group}"
    path = f"[{cpu_simd} path]" if cpu_simd else ""
    name = f"flashquant {backend}{'-' + strategy if strategy else ''}{path} int{bits} {gname}"
    return Case("quant_matmul", "", name, False, {}, _dt(dtype), nbytes, 0, make)


def _qmm_linear(device, n, k, m, dtype):
    def make():
        x = torch.randn(m, k, device=device, dtype=dtype)
        inputs = _rotated(
            device, lambda: (x, torch.randn(n, k, device=device, dtype=dtype)), n * k * dtype.itemsize
        )
        return (lambda x, w: F.linear(x, w)), inputs

    name = "cuBLAS F.linear" if device == "cuda" else "torch F.linear"
    return Case(
        "quant_matmul",
        "",
        f"{name} {_dt(dtype)}",
        True,
        {},
        _dt(dtype),
        (n * k + m * k + m * n) * dtype.itemsize,
        0,
        make,
    )


def _qmm_torch_int8(device, n, k, m, dtype):
    def make():
        x = torch.randn(m, k, device=device, dtype=dtype)
        inputs = _rotated(
            device,
            lambda: (
                x,
                torch.randint(-127, 127, (n, k), dtype=torch.int8, device=device),
                torch.rand(n, device=device, dtype=dtype),
            ),
            n * k,
        )
        return (lambda x, w, s: torch._weight_int8pack_mm(x, w, s)), inputs

    return Case(
        "quant_matmul",
        "",
        "torch _weight_int8pack_mm",
        True,
        {},
        _dt(dtype),
        n * k + n * 2 + (m * k + m * n) * dtype.itemsize,
        0,
        make,
    )


def _qmm_torch_int4(device, n, k, m, dtype, group=128):
    def make():
        x = torch.randn(m, k, device=device, dtype=dtype)

        def one():
            if device == "cuda":
                packed_u8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
                w = torch._convert_weight_to_int4pack(packed_u8, 8)
            else:
                w = torch._convert_weight_to_int4pack_for_cpu(
                    torch.randint(0, 16, (n, k), dtype=torch.int32), 2
                )
            sz = torch.rand(k // group, n, 2, device=device, dtype=dtype)
            return x, w, sz

        inputs = _rotated(device, one, n * k // 2)
        op = torch._weight_int4pack_mm if device == "cuda" else torch._weight_int4pack_mm_for_cpu
        return (lambda x, w, sz: op(x, w, group, sz)), inputs

    name = "torch _weight_int4pack_mm (tinygemm)" if device == "cuda" else "torch _weight_int4pack_mm_for_cpu"
    return Case(
        "quant_matmul",
        "",
        f"{name} g{group}",
        True,
        {},
        _dt(dtype),
        n * k // 2 + (k // group) * n * 4 + (m * k + m * n) * dtype.itemsize,
        0,
        make,
    )


def _label(c: Case, n: int, k: int, m: int, suffix: str = "") -> Case:
    """Group (cases compared with each other), shape and FLOPs of a quant_matmul case."""
    c.group = f"quant_matmul N={n} K={k} M={m}{suffix}"
    c.shape = {"N": n, "K": k, "M": m}
    c.flops = 2 * m * n * k
    return c


def quant_matmul_cases(device: str, shapes, ms, dtype=None) -> list[Case]:
    """shapes: (N = out_features, K = in_features) pairs; ms: token counts."""
    out = []
    for n, k in shapes:
        for m in ms:
            act = dtype or (torch.bfloat16 if device == "cpu" else torch.float16)
            cases = [_qmm_linear(device, n, k, m, act)]
            if device == "cpu":
                cases.append(_qmm_linear(device, n, k, m, torch.float32))
                cases += [
                    _qmm_torch_int4(device, n, k, m, torch.bfloat16),
                    _qmm_torch_int8(device, n, k, m, act),
                ]
                backends = ["cpu"]
            else:
                cases.append(_qmm_linear(device, n, k, m, torch.bfloat16))
                cases += [
                    _qmm_torch_int4(device, n, k, m, torch.bfloat16),
                    _qmm_torch_int8(device, n, k, m, act),
                ]
                backends = ["triton", "cuda"]
            for be in backends:
                for bits, group in ((4, 128), (8, -1)):
                    c = _qmm_flashquant(device, n, k, m, bits, group, be, act)
                    c.unavailable = _why_not(be, device)
                    if c.unavailable is None and be == "cuda" and m > 16:
                        c.unavailable = "the CUDA GEMV covers M <= 16"
                    cases.append(c)
            if device == "cpu":
                # the kernel's narrower instruction-set paths this CPU also runs (what CPUs without the wider
                # ones get), timed in the same run
                cases += [
                    _qmm_flashquant(device, n, k, m, bits, group, "cpu", act, cpu_simd=level)
                    for level in _cpu_simd_narrower()
                    for bits, group in ((4, 128), (8, -1))
                ]
            out += [_label(c, n, k, m) for c in cases]
    return out


def dispatch_crossover_cases(device: str) -> list[Case]:
    """quant_matmul's own backends against each other and against `auto`, over M: where does each stop winning?
    The anchor is flashquant's torch path (dequantize + F.linear), on CPUs also F.linear on unquantized weights;
    `auto` should match the best flashquant row. On a GPU also
    the CUDA vs Triton decode kernels at 4 and 8 query heads per KV head (auto tries CUDA first; SDPA is the
    anchor there)."""
    if device == "cpu":
        # the cpu backend's two strategies are timed forced (below), so "auto" is the only unforced row
        backends, ms = ("auto",), [16, 64, 128, 256, 512, 1024]
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
    else:
        backends, ms, dtypes = (
            ("cuda", "triton", "auto"),
            [1, 4, 16, 32, 64, 128, 256, 512, 2048],
            (torch.bfloat16,),
        )
    out = []
    n, k = 4096, 4096
    for dtype in dtypes:
        for m in ms:
            for bits, group in ((4, 128), (8, -1)):
                if device == "cpu":
                    # what a bf16/fp32 model without quantization runs: F.linear on weights already in that dtype
                    out.append(
                        _label(_qmm_linear(device, n, k, m, dtype), n, k, m, f" int{bits} {_dt(dtype)}")
                    )
                for be in ("torch", *backends):
                    c = _qmm_flashquant(device, n, k, m, bits, group, be, dtype)
                    c.anchor = be == "torch"
                    c.unavailable = None if be in ("torch", "auto") else _why_not(be, device)
                    if c.unavailable is None and be == "cuda" and m > 16:
                        c.unavailable = "the CUDA GEMV covers M <= 16"
                    out.append(_label(c, n, k, m, f" int{bits} {_dt(dtype)}"))
                # bf16 on CPUs with AMX: the kernel's next-narrower path (AVX-512 VNNI) too, which is what bf16 ran
                # before the AMX path and what CPUs without AMX run
                narrower = _cpu_simd_narrower() if device == "cpu" and dtype == torch.bfloat16 else []
                if narrower and _cpu_best_simd() == "amx_bf16":
                    c = _qmm_flashquant(device, n, k, m, bits, group, "cpu", dtype, cpu_simd=narrower[-1])
                    out.append(_label(c, n, k, m, f" int{bits} {_dt(dtype)}"))
                # Around DEQUANT_GEMM_MIN_M[bits] / cpu_dequant_min_m: the launcher's strategies, each forced (on
                # CPUs half-precision activations also through the fp32 GEMM: cpu_dequant_strategy)
                launcher = "cpu" if device == "cpu" else "triton"
                strategies = ("fused", "dequant") if device == "cpu" or m >= 64 else ()
                if device == "cpu" and dtype != torch.float32:
                    strategies += ("dequant_fp32",)
                for strategy in strategies:
                    c = _qmm_flashquant(device, n, k, m, bits, group, launcher, dtype, strategy)
                    c.unavailable = _why_not(launcher, device)
                    out.append(_label(c, n, k, m, f" int{bits} {_dt(dtype)}"))
    if device != "cpu":
        for hq in (32, 64):  # G = 4 (Llama-3-8B) and G = 8 (Llama-3-70B)
            out += decode_cases(device, [1, 16], [8192], paged_modes=(False,), hq=hq, hkv=8)
    return out


# ---- attention -----------------------------------------------------------------------------------------------
def _sdpa_case(backend_name, q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend_name]

    def fn(q, k, v):
        with sdpa_kernel(sdp):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
            )

    return fn, [
        (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
    ]


def prefill_cases(
    device: str,
    seqlens,
    head_dims,
    causal_modes=(False, True),
    hq=32,
    hkv=8,
    tokens=16384,
    dtype=torch.bfloat16,
) -> list[Case]:
    out = []
    for d in head_dims:
        for s in seqlens:
            for causal in causal_modes:
                b = max(1, tokens // s)
                flops = 4 * b * hq * s * s * d // (2 if causal else 1)
                nbytes = 2 * b * s * (2 * hq + 2 * hkv) * d

                def inputs(b=b, s=s, d=d):
                    return (
                        torch.randn(b, s, hq, d, device=device, dtype=dtype),
                        torch.randn(b, s, hkv, d, device=device, dtype=dtype),
                        torch.randn(b, s, hkv, d, device=device, dtype=dtype),
                    )

                group = f"prefill S={s} D={d} causal={causal}"
                shape = {"B": b, "S": s, "Hq": hq, "Hkv": hkv, "D": d, "causal": causal}

                def fq_make(inputs=inputs, causal=causal):
                    return (lambda q, k, v: fq.attention(q, k, v, causal=causal, backend="triton")), [
                        inputs()
                    ]

                c = Case(
                    "prefill", group, "flashquant triton", False, shape, _dt(dtype), nbytes, flops, fq_make
                )
                c.unavailable = _why_not("triton", device)
                out.append(c)
                for be in ("flash", "cudnn", "efficient"):

                    def sd_make(inputs=inputs, be=be, causal=causal):
                        return _sdpa_case(be, *inputs(), causal)

                    out.append(
                        Case(
                            "prefill",
                            group,
                            f"SDPA {be}",
                            True,
                            shape,
                            _dt(dtype),
                            nbytes,
                            flops,
                            sd_make,
                        )
                    )

                def flex_make(inputs=inputs, causal=causal, s=s):
                    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                    q, k, v = (t.transpose(1, 2).contiguous() for t in inputs())
                    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, s, s) if causal else None
                    comp = torch.compile(flex_attention)
                    return (lambda q, k, v: comp(q, k, v, block_mask=mask, enable_gqa=True)), [(q, k, v)]

                out.append(
                    Case(
                        "prefill",
                        group,
                        "FlexAttention (compiled)",
                        True,
                        shape,
                        _dt(dtype),
                        nbytes,
                        flops,
                        flex_make,
                        None if device == "cuda" else "benchmarked on CUDA only (CPU compile is slow)",
                    )
                )
    return out


def decode_cases(
    device: str,
    batches,
    cache_lens,
    paged_modes=(False, True),
    hq=32,
    hkv=8,
    d=128,
    dtype=torch.bfloat16,
    page=64,
    sq=1,
) -> list[Case]:
    """attention_with_kvcache of sq new tokens per sequence (1: decode; a few: speculative verification), causal,
    over b x s cached tokens, next to SDPA. On CPUs whose best path is wider, the C++ kernel's AVX2 path too (its
    AVX-512 path's baseline), and for sq > 1 on AMX CPUs its AVX-512 vector path (the tile path's baseline)."""
    out = []
    narrower = _cpu_simd_narrower() if device == "cpu" else []
    cpu_paths = [None] + [lvl for lvl in ("avx512_vnni",) * (sq > 1) + ("avx2",) if lvl in narrower]
    for paged in paged_modes:
        for b in batches:
            for s in cache_lens:
                kv_bytes = 2 * b * s * hkv * d * dtype.itemsize
                if kv_bytes > (24 << 30):
                    continue
                group = f"decode B={b} cache={s} {'paged' if paged else 'contiguous'}"
                if (hq, hkv) != (32, 8):  # Llama-3's heads are the default; other GQA groups are named
                    group += f" Hq/Hkv={hq}/{hkv}"
                if dtype != torch.bfloat16:  # so is any dtype but bf16's (a group compares one dtype)
                    group += f" {_dt(dtype)}"
                if sq != 1:
                    group += f" Sq={sq}"
                shape = {
                    "B": b,
                    "Sq": sq,
                    "cache": s,
                    "Hq": hq,
                    "Hkv": hkv,
                    "D": d,
                    "paged": paged,
                    "page": page,
                }

                def make_one(b=b, s=s, paged=paged):  # (q, k_cache, v_cache, cache_seqlens, block_table)
                    lens = torch.full((b,), s, dtype=torch.int32, device=device)
                    q = torch.randn(b, sq, hq, d, device=device, dtype=dtype)
                    if paged:
                        nblk = b * s // page
                        kc = torch.randn(nblk, page, hkv, d, device=device, dtype=dtype)
                        table = torch.randperm(nblk, device=device).reshape(b, -1).to(torch.int32)
                    else:
                        kc, table = torch.randn(b, s, hkv, d, device=device, dtype=dtype), None
                    return q, kc, torch.randn_like(kc), lens, table

                runs = [("triton", None), ("cuda", None)] if device == "cuda" else [("triton", None)]
                runs += [("cpu", level) for level in cpu_paths] if device == "cpu" else []
                for be, level in runs:
                    # The attention kernel alone over all s cached keys, as SDPA is timed (until 2026-11-23 these
                    # cases also appended a token, which SDPA's did not), rotating through cache copies larger
                    # than twice the last-level cache as SDPA's do.

                    def fq_make(be=be, level=level, make_one=make_one, kv_bytes=kv_bytes):
                        def fn(q, kc, vc, lens, table):
                            return fq.attention_with_kvcache(q, kc, vc, lens, block_table=table, backend=be)

                        def fn_capped(*args):
                            with _cpu_simd_cap(level):  # a few us of a >= 0.5 ms call
                                return fn(*args)

                        return (fn if level is None else fn_capped), _rotated(device, make_one, kv_bytes)

                    c = Case(
                        "decode",
                        group,
                        f"flashquant {be}" + (f" ({level})" if level else ""),
                        False,
                        shape,
                        _dt(dtype),
                        kv_bytes,
                        4 * b * hq * sq * s * d,
                        fq_make,
                    )
                    c.unavailable = _why_not(be, device)
                    out.append(c)

                def sdpa_make(make_one=make_one, paged=paged, kv_bytes=kv_bytes, b=b, s=s):
                    gathered = []  # the gather's outputs, allocated once for every rotated input
                    # the kernel's causal mask for sq > 1: new token i sees keys j <= s - sq + i (bottom-right)
                    mask = torch.ones(sq, s, dtype=torch.bool, device=device).tril(s - sq) if sq > 1 else None

                    def fn(q, kc, vc, lens, table):
                        if paged:  # what a PyTorch user does with a paged cache: gather the blocks, then SDPA
                            # Into buffers kept between calls: a fresh 30-270 MB tensor per call timed page faults
                            # (on the CPU), and the host's work on them slowed the cases timed next to it.
                            idx = table.reshape(-1).long()
                            if not gathered:
                                gathered.extend(kc.new_empty((idx.numel(), *kc.shape[1:])) for _ in range(2))
                            kc = torch.index_select(kc, 0, idx, out=gathered[0]).view(b, -1, *kc.shape[2:])
                            vc = torch.index_select(vc, 0, idx, out=gathered[1]).view(b, -1, *vc.shape[2:])
                        return F.scaled_dot_product_attention(
                            q.transpose(1, 2),
                            kc.transpose(1, 2),
                            vc.transpose(1, 2),
                            attn_mask=mask,
                            enable_gqa=True,
                        )

                    return fn, _rotated(device, make_one, kv_bytes)

                out.append(
                    Case(
                        "decode",
                        group,
                        "SDPA (enable_gqa)",
                        True,
                        shape,
                        _dt(dtype),
                        kv_bytes,
                        4 * b * hq * sq * s * d,
                        sdpa_make,
                    )
                )
    return out


def varlen_decode_cases(
    device: str, batches, cache_lens, hq=32, hkv=8, d=128, dtype=torch.bfloat16, prefill_chunk=0
) -> list[Case]:
    """attention_varlen as a server's continuous batching runs a decode step: b sequences, one new token each, their
    caches packed back to back with ragged lengths (evenly from s / 4 up to s). With `prefill_chunk`, the batch
    starts with one more sequence: a prompt's first chunk of that many tokens, causal over its own keys (a
    chunked-prefill step). Next to SDPA once per sequence, what a PyTorch user without a varlen kernel runs (and
    flashquant's "torch" path)."""
    out = []
    for b in batches:
        for s in cache_lens:
            lens = [s // 4 + (s - s // 4) * i // max(b - 1, 1) for i in range(b)]
            q_lens = [1] * b
            if prefill_chunk:
                lens, q_lens = [prefill_chunk] + lens, [prefill_chunk] + q_lens
            total = sum(lens)
            kv_bytes = 2 * total * hkv * d * dtype.itemsize
            group = f"varlen decode B={b} cache<={s}"
            if prefill_chunk:
                group = f"varlen prefill chunk {prefill_chunk} + decode B={b} cache<={s}"
            if (hq, hkv) != (32, 8):
                group += f" Hq/Hkv={hq}/{hkv}"
            if dtype != torch.bfloat16:
                group += f" {_dt(dtype)}"
            shape = {"B": b, "Sq": 1, "cache": s, "cache_total": total, "Hq": hq, "Hkv": hkv, "D": d}
            if prefill_chunk:
                shape["prefill_chunk"] = prefill_chunk
            flops = 4 * hq * (total - prefill_chunk) * d + 2 * hq * prefill_chunk * prefill_chunk * d

            def make_one(b=b, lens=lens, q_lens=q_lens, total=total):  # (q, k, v, cu_q, cu_k, max_q, max_k)
                cu_q = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
                cu_k = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
                q = torch.randn(sum(q_lens), hq, d, device=device, dtype=dtype)
                k = torch.randn(total, hkv, d, device=device, dtype=dtype)
                return q, k, torch.randn_like(k), cu_q, cu_k, max(q_lens), max(lens)

            # auto on CPUs: a mixed batch is split by length (the kernel for the decode steps, SDPA for the chunk)
            backends = ("triton", "cpu", "auto") if prefill_chunk else ("triton", "cpu")
            for be in backends if device == "cpu" else ("triton",):

                def fq_make(be=be, make_one=make_one, kv_bytes=kv_bytes):
                    def fn(q, k, v, cu_q, cu_k, max_q, max_k):
                        return fq.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, backend=be)

                    return fn, _rotated(device, make_one, kv_bytes)

                c = Case(
                    "varlen", group, f"flashquant {be}", False, shape, _dt(dtype), kv_bytes, flops, fq_make
                )
                c.unavailable = None if be == "auto" else _why_not(be, device)
                out.append(c)

            def sdpa_make(make_one=make_one, kv_bytes=kv_bytes):
                def fn(q, k, v, cu_q, cu_k, max_q, max_k):
                    cq, ck = cu_q.tolist(), cu_k.tolist()
                    return [
                        F.scaled_dot_product_attention(
                            q[None, cq[i] : cq[i + 1]].transpose(1, 2),
                            k[None, ck[i] : ck[i + 1]].transpose(1, 2),
                            v[None, ck[i] : ck[i + 1]].transpose(1, 2),
                            is_causal=cq[i + 1] - cq[i] > 1,  # the prompt chunk: as many queries as keys
                            enable_gqa=True,
                        )
                        for i in range(len(ck) - 1)
                    ]

                return fn, _rotated(device, make_one, kv_bytes)

            out.append(
                Case(
                    "varlen",
                    group,
                    "SDPA per sequence (enable_gqa)",
                    True,
                    shape,
                    _dt(dtype),
                    kv_bytes,
                    flops,
                    sdpa_make,
                )
            )
    return out


# ---- presets --------------------------------------------------------------------------------------------------
LLAMA3_8B_LINEARS = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N out, K in)
LLAMA3_70B_LINEARS = [(8192, 8192), (28672, 8192), (8192, 28672)]
GPU_MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096]


def interleave_groups(*families: list[Case]) -> list[Case]:
    """The families' groups round-robin (each group's cases, anchors included, stay together): a run cut short
    by its time budget (run_cases' max_seconds) has then measured some groups of every family."""
    queues = [[list(g) for _, g in itertools.groupby(f, key=lambda c: c.group)] for f in families]
    return [c for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q) for c in q[i]]


def preset(name: str, device: str) -> list[Case]:
    if name == "smoke":  # tiny shapes: keeps every family importable and runnable (CI, on the CPU)
        return (
            quant_matmul_cases(device, [(64, 256)], [1])
            + prefill_cases(device, [128], [64], (True,), hq=4, hkv=2, tokens=128, dtype=torch.float16)
            + decode_cases(device, [1], [256], (False,), hq=4, hkv=2, d=64, dtype=torch.float16)
            + varlen_decode_cases(device, [3], [256], hq=4, hkv=2, d=64, dtype=torch.float16)
            + varlen_decode_cases(device, [2], [64], hq=4, hkv=2, d=64, dtype=torch.float16, prefill_chunk=40)
        )
    if name == "crossover":
        return dispatch_crossover_cases(device)
    if device == "cpu":
        ms = [1] if name == "quick" else [1, 4, 16]
        batches, lens = ([1], [8192]) if name == "quick" else ([1, 4], [2048, 8192])
        return (
            quant_matmul_cases("cpu", [(4096, 4096), (14336, 4096)], ms)
            + decode_cases("cpu", batches, lens, dtype=torch.bfloat16)
            + decode_cases("cpu", batches, lens, dtype=torch.float32)
            # speculative verification: a few new tokens per sequence (bf16: the AMX tile path where present)
            + [c for sq in (4, 16) for c in decode_cases("cpu", batches, lens, dtype=torch.bfloat16, sq=sq)]
            # continuous batching: one decode token for each of several sequences with ragged caches
            + varlen_decode_cases(
                "cpu", [8] if name == "quick" else [4, 16], [4096] if name == "quick" else [1024, 4096]
            )
            + varlen_decode_cases("cpu", [8], [4096], dtype=torch.float32)
            # chunked prefill: a prompt's 512-token chunk in the same batch as the decode steps
            + varlen_decode_cases("cpu", [8] if name == "quick" else [4, 16], [4096], prefill_chunk=512)
        )
    if name == "quick":
        return (
            quant_matmul_cases(device, [(4096, 4096), (14336, 4096)], [1, 16, 4096])
            + prefill_cases(device, [1024, 4096], [128])
            + decode_cases(device, [1, 16], [8192])
            + varlen_decode_cases(device, [16], [8192])
        )
    linears = LLAMA3_8B_LINEARS if name == "llama3-8b" else LLAMA3_70B_LINEARS
    return interleave_groups(
        quant_matmul_cases(device, linears, GPU_MS),
        prefill_cases(device, [512, 1024, 2048, 4096, 8192, 16384], [64, 128]),
        decode_cases(device, [1, 8, 32, 64], [1024, 8192, 32768, 131072]),
        varlen_decode_cases(device, [8, 64], [1024, 8192]),
        varlen_decode_cases(device, [16], [8192], prefill_chunk=2048),
    )
