"""One launch of each kernel the next GPU session should speed up, for Nsight Compute (bench/NOTES.md, "H100: what
to do next"): the int4/int8 GEMVs at M = 1 (CUDA and Triton), the one-pass dequantize, batch-1 decode attention
over an 8k cache (CUDA and Triton), and the decode step's small kernels (rms_norm with the residual, rotary, the
KV append, silu_mul: launch-bound, so their durations are the number), at Llama-3-8B shapes in bf16.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats python3 scripts/profile_kernels.py

Warm-up (Triton JIT, the extension's first launch, the allocator) runs outside the profiled range; then each op
runs once between cudaProfilerStart and cudaProfilerStop, named on stdout in launch order. `--small` uses tiny
shapes and, without a GPU, the Triton interpreter (the tests run it that way so the script is known to work
before a device call spends time on it)."""

from __future__ import annotations

import argparse
import sys

import torch

import flashquant as fq


def ops(device: str, small: bool):
    """(name, fn) pairs: every kernel to profile that can run here."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    n, k, group = (64, 256, 64) if small else (14336, 4096, 128)
    qweights = {
        "int4 g128": fq.quantize(torch.randn(n, k, device=device, dtype=dtype), 4, group),
        "int8 per-channel": fq.quantize(torch.randn(n, k, device=device, dtype=dtype), 8, -1),
    }
    x = torch.randn(1, k, device=device, dtype=dtype)
    have = fq.backends()
    kernel_backends = [b for b in ("cuda", "triton") if have[b].available]  # "cuda" needs a visible GPU
    for label, qw in qweights.items():
        for backend in kernel_backends:
            yield (
                f"quant_matmul {label} {n}x{k} M=1 {backend}",
                lambda qw=qw, b=backend: fq.quant_matmul(x, qw, backend=b),
            )
    if have["triton"].available:
        from flashquant.kernels.dequantize import dequantize_triton

        qw = fq.quantize(torch.randn(k, k, device=device, dtype=dtype), 4, group)
        yield (
            f"dequantize int4 g{group} {k}x{k}",
            lambda: dequantize_triton(qw.qdata, qw.scales, qw.zeros, 4, group, dtype),
        )
    batch, seqlen, hq, hkv, d = (1, 256, 4, 2, 64) if small else (1, 8192, 32, 8, 128)
    q = torch.randn(batch, 1, hq, d, device=device, dtype=dtype)
    k_cache = torch.randn(batch, seqlen, hkv, d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    for backend in kernel_backends:
        yield (
            f"decode B={batch} cache={seqlen} {hq}/{hkv} heads D={d} {backend}",
            lambda b=backend: fq.attention_with_kvcache(
                q, k_cache, v_cache, cache_seqlens, causal=True, backend=b
            ),
        )

    if have[
        "triton"
    ].available:  # one decode token of Llama-3-8B (32/8 heads, D = 128, hidden 4096, MLP 14336)
        hidden, mlp = (64, 128) if small else (4096, 14336)
        from flashquant.attention import append_kv

        h, r = (
            torch.randn(1, hidden, device=device, dtype=dtype),
            torch.randn(1, hidden, device=device, dtype=dtype),
        )
        w = torch.ones(hidden, device=device, dtype=dtype)
        yield f"rms_norm + residual H={hidden}", lambda: fq.rms_norm(h, w, 1e-5, residual=r)
        qkv = torch.randn(1, 1, hq + 2 * hkv, d, device=device, dtype=dtype)  # a fused projection's output
        qn, kn, vn = qkv.split([hq, hkv, hkv], 2)
        pos = torch.full((1, 1), seqlen - 1, device=device, dtype=torch.int64)
        inv_freq = torch.rand(d // 2, device=device)
        yield f"rotary q+k {hq}/{hkv} heads D={d}", lambda: fq.rotary_embedding(qn, kn, pos, inv_freq)
        lens = torch.full((batch,), seqlen - 1, dtype=torch.int32, device=device)
        yield f"append_kv {hkv} heads D={d}", lambda: append_kv(k_cache, v_cache, lens, kn, vn)
        gate_up = torch.randn(1, 2 * mlp, device=device, dtype=dtype)
        yield f"silu_mul {mlp}", lambda: fq.silu_mul(*gate_up.chunk(2, -1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU: the Triton interpreter)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        print("profile_kernels.py profiles GPU kernels: run it on a CUDA device (or --small to check it)")
        return 2
    todo = list(ops(device, args.small))
    for _, fn in todo:  # warm-up: JIT, first launches, allocator
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
    for name, fn in todo:
        print(f"profiled: {name}", flush=True)
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
