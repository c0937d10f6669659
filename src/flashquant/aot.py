"""python -m flashquant compile-check: compile the Triton kernels for A100, L4 and H100 on any machine, no GPU needed.

The Triton interpreter (CPU CI) checks what the kernels compute, not how they compile for a GPU: it cannot run
bf16, and it says nothing about registers, shared memory per launch config, or whether the tensor-core and
16-byte-copy paths are taken. This runs the real launchers on meta tensors (shapes, strides and dtypes, no
data) at Llama-3-8B shapes, records the launches they would make, compiles each one for the target with
Triton's own compiler and ptxas (no driver, no GPU), and reads off the cubin:

* registers per thread, local-memory (spill) bytes, shared memory per program, programs per SM and waves of the
  grid over the chip's SMs;
* matrix instructions in the SASS: HGMMA (Hopper warpgroup MMA, sm_90a) or HMMA (mma.sync);
* the width of each global->shared async copy (cp.async; 16 bytes is a full-width copy).

  python -m flashquant compile-check                   # default configs, bf16 + fp16, sm_80, sm_89, sm_90a
  python -m flashquant compile-check --candidates      # every config `tune` would try (sm_90a, bf16)
  python -m flashquant compile-check --json FILE       # the table as JSON too

Checks (exit status 1 if one fails): every launch compiles and fits the arch's shared memory; the default
configs do not spill; the attention and quantized-matmul kernels use tensor cores in fp16/bf16; the quantized
matmul copies its weight tiles 16 bytes at a time. It is a static check: speed is measured only on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class Arch:
    cc: int  # compute capability x 10
    name: str
    sms: int  # of the reference chip (A100 SXM / H100 SXM), for waves
    smem_per_block: int  # opt-in maximum of one program, bytes
    smem_per_sm: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


ARCHS = {
    80: Arch(80, "sm_80 (A100)", 108, 163 * 1024, 164 * 1024),
    89: Arch(89, "sm_89 (L4, RTX 4090)", 58, 99 * 1024, 100 * 1024, threads_per_sm=1536, blocks_per_sm=24),
    90: Arch(90, "sm_90a (H100 SXM)", 132, 227 * 1024, 228 * 1024),
}

# A default config may spill a little (ptxas parks a loop-invariant or two on the stack; L1 serves them), but not
# in its main loop beyond this share of the instructions.
MAX_LOOP_SPILL_FRACTION = 0.02

# Llama-3-8B: 32 query heads, 8 KV heads; the MLP's gate/up projection N=14336, K=4096.
HQ, HKV, N_MLP, K_MLP = 32, 8, 14336, 4096


@dataclasses.dataclass
class Launch:
    case: str
    kernel: object  # triton.runtime.jit.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Result:
    case: str
    kernel: str
    arch: int
    dtype: str
    config: str
    programs: int
    error: str = ""
    regs: int = 0
    spill_bytes: int = 0
    shared: int = 0
    programs_per_sm: int = 0
    waves: float = 0.0
    hgmma: int = 0
    hmma: int = 0
    loop_instructions: int = 0  # SASS instructions in the main (longest) loop, per iteration
    loop_i2f: int = 0  # int->float conversions among them (quarter rate)
    loop_spills: int = 0  # local-memory loads/stores (LDL/STL) among them
    copy_bytes: dict = dataclasses.field(default_factory=dict)  # cp.async width -> count in the PTX
    seconds: float = 0.0


# ---- the cases: launchers called on meta tensors ----------------------------------------------------------


def _cases(dtype: torch.dtype) -> dict[str, tuple[str | None, Callable]]:
    """name -> (the config key it exercises, or None for a fixed launch config; launch(config))."""
    from .kernels import attention as tri
    from .kernels.append_kv import append_kv_triton
    from .kernels.dequantize import dequantize_triton
    from .kernels.quant_matmul import quant_matmul_triton
    from .kernels.rms_norm import rms_norm_triton
    from .kernels.rotary import rotary_triton
    from .kernels.silu_mul import silu_mul_triton

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    def i32(*shape):
        return t(*shape, dt=torch.int32)

    cases: dict[str, tuple[str, Callable]] = {}
    for d in (64, 128, 256):
        q, k = t(1, 4096, HQ, d), t(1, 4096, HKV, d)
        cases[f"prefill causal S=4096 d{d}"] = (
            f"attention.prefill.d{d}",
            lambda cfg, q=q, k=k, d=d: tri.attention_dense(q, k, k, True, d**-0.5, (-1, -1), 0.0, False, cfg),
        )
        q1, kc = t(8, 1, HQ, d), t(8, 8192, HKV, d)
        cases[f"decode B=8 cache=8192 d{d}"] = (
            f"attention.decode.d{d}",
            lambda cfg, q1=q1, kc=kc, d=d: tri.attention_kvcache(
                q1, kc, kc, i32(8), None, True, d**-0.5, (-1, -1), 0.0, False, 0, cfg
            ),
        )
    q, k = t(1, 4096, HQ, 128), t(1, 4096, HKV, 128)
    cases["prefill window=256 softcap lse d128"] = (
        "attention.prefill.d128",
        lambda cfg, q=q, k=k: tri.attention_dense(q, k, k, False, 0.088, (256, 0), 30.0, True, cfg),
    )
    qv, kv, cu = t(4096, HQ, 128), t(4096, HKV, 128), i32(5)
    cases["varlen 4x1024 causal d128"] = (
        "attention.prefill.d128",
        lambda cfg: tri.attention_varlen(
            qv, kv, kv, cu, cu, 1024, 1024, True, 0.088, (-1, -1), 0.0, False, 0, cfg
        ),
    )
    qv1, kv, cu = t(8, HQ, 128), t(8 * 8192, HKV, 128), i32(9)
    cases["varlen decode 8x1 cache=8192 split-KV d128"] = (
        "attention.decode.d128",
        lambda cfg: tri.attention_varlen(
            qv1, kv, kv, cu, cu, 1, 8192, True, 0.088, (-1, -1), 0.0, True, 4, cfg
        ),
    )
    q1, pages, table = t(8, 1, HQ, 128), t(8 * 512, 16, HKV, 128), i32(8, 512)
    cases["decode paged page=16 B=8 cache=8192 d128"] = (
        "attention.decode.d128",
        lambda cfg: tri.attention_kvcache(
            q1, pages, pages, i32(8), table, True, 0.088, (-1, -1), 0.0, False, 0, cfg
        ),
    )
    q1, kc = t(1, 1, HQ, 128), t(1, 131072, HKV, 128)
    cases["decode B=1 cache=128k d128"] = (
        "attention.decode.d128",
        lambda cfg: tri.attention_kvcache(
            q1, kc, kc, i32(1), None, True, 0.088, (-1, -1), 0.0, False, 0, cfg
        ),
    )
    q4, kc = t(8, 4, HQ, 128), t(8, 8192, HKV, 128)
    cases["verify Sq=4 B=8 cache=8192 d128"] = (
        "attention.decode.d128",
        lambda cfg: tri.attention_kvcache(
            q4, kc, kc, i32(8), None, True, 0.088, (-1, -1), 0.0, False, 0, cfg
        ),
    )

    def qmm(m, bits, group, asym, n=N_MLP, bias=False):
        w = t(n, K_MLP * bits // 8, dt=torch.uint8)
        scales = t(n, K_MLP // group)
        zeros = t(n, K_MLP // group, dt=torch.uint8) if asym else None
        b = t(n) if bias else None
        x = t(m, K_MLP)
        # The fused kernel at every M (from DEQUANT_GEMM_MIN_M auto dequantizes instead: the cases below).
        return lambda cfg: quant_matmul_triton(
            x, w, scales, zeros, bits, group, b, config=cfg, strategy="fused"
        )

    for bits, m in ((4, 1), (4, 16), (4, 64), (4, 4096), (8, 1), (8, 64), (8, 4096)):
        group = 128 if bits == 4 else K_MLP
        name = f"qmm int{bits} {'g128' if bits == 4 else 'per-channel'} M={m} {N_MLP}x{K_MLP}"
        bucket = "m16" if m <= 16 else "m64" if m <= 64 else "mbig"
        cases[name] = (f"quant_matmul.int{bits}.{bucket}", qmm(m, bits, group, False))
    cases[f"qmm int4 g128 asym M=1 {N_MLP}x{K_MLP}"] = ("quant_matmul.int4.m16", qmm(1, 4, 128, True))
    # N = 4096 (o_proj, down_proj): 64 column tiles, so split-K and the in-kernel sum of its partials
    cases[f"qmm int4 g128 M=1 4096x{K_MLP} split-K"] = ("quant_matmul.int4.m16", qmm(1, 4, 128, False, 4096))
    # with a bias (Qwen2's q/k/v), added where the output is written: both write-outs, split-K and not
    cases[f"qmm int4 g128 M=1 4096x{K_MLP} split-K bias"] = (
        "quant_matmul.int4.m16",
        qmm(1, 4, 128, False, 4096, bias=True),
    )
    cases[f"qmm int8 per-channel M=64 {N_MLP}x{K_MLP} bias"] = (
        "quant_matmul.int8.m64",
        qmm(64, 8, K_MLP, False, bias=True),
    )
    for bits, group in ((4, 128), (8, K_MLP)):  # one fixed launch config: key None
        w, scales = t(N_MLP, K_MLP * bits // 8, dt=torch.uint8), t(N_MLP, K_MLP // group)
        name = f"dequantize int{bits} {'g128' if bits == 4 else 'per-channel'} {N_MLP}x{K_MLP}"
        cases[name] = (
            None,
            lambda cfg, w=w, s=scales, b=bits, g=group: dequantize_triton(w, s, None, b, g, dtype),
        )
    # The layer ops at one decode step of Llama-3-8B (fixed launch configs: key None).
    h, f = t(1, 4096), t(4096)
    cases["rms_norm H=4096"] = (None, lambda cfg: rms_norm_triton(h, f, 1e-5))
    cases["rms_norm + residual H=4096"] = (None, lambda cfg: rms_norm_triton(h, f, 1e-5, t(1, 4096)))
    rq, rk, pos = t(1, 1, HQ, 128), t(1, 1, HKV, 128), t(1, 1, dt=torch.int64)
    cases["rotary q+k 32/8 heads d128"] = (
        None,
        lambda cfg: rotary_triton(rq, rk, pos, t(64, dt=torch.float32)),
    )
    # KV-cache appends at one decode step, new k/v being slices of a fused projection's output
    cache_c, cache_p, knew = t(8, 8192, HKV, 128), t(8 * 512, 16, HKV, 128), t(8, 1, 2 * HKV, 128)[:, :, :HKV]
    cases["append_kv B=8 d128"] = (
        None,
        lambda cfg: append_kv_triton(cache_c, cache_c, i32(8), knew, knew, None, i32(8)),
    )
    cases["append_kv paged page=16 B=8 d128"] = (
        None,
        lambda cfg: append_kv_triton(cache_p, cache_p, i32(8), knew, knew, i32(8, 512), i32(8)),
    )
    g = t(1, N_MLP)
    cases[f"silu_mul {N_MLP}"] = (None, lambda cfg: silu_mul_triton(g, g))
    return cases


class _Recorder:
    """Stands in for a kernel object in its module: `kernel[grid](...)` records the launch instead."""

    def __init__(self, kernel, sink: list, case: str):
        self.kernel, self.sink, self.case = kernel, sink, case

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.case, self.kernel, grid, args, kwargs))


@contextlib.contextmanager
def _recording(arch: Arch, sink: list, case: str):
    from .kernels import append_kv, attention, dequantize, quant_matmul, rms_norm, rotary, silu_mul

    def sms(device, interpreter_sms):  # size split-K / split-KV grids for the target chip, not the stand-in
        return arch.sms

    targets = [
        (attention, "_attn_fwd_kernel"),
        (attention, "_combine_kernel"),
        (quant_matmul, "_qmm_kernel"),
        (dequantize, "_dequant_kernel"),
        (rms_norm, "_rms_norm_kernel"),
        (rotary, "_rotary_kernel"),
        (silu_mul, "_silu_mul_kernel"),
        (append_kv, "_append_kv_kernel"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets]
    saved += [(mod, "num_sms", mod.num_sms) for mod in (attention, quant_matmul)]
    try:
        for mod, name, kernel in saved[: len(targets)]:
            setattr(mod, name, _Recorder(kernel, sink, case))
        for mod in (attention, quant_matmul):
            mod.num_sms = sms
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def record(case: str, launch: Callable, arch: Arch, config=None) -> list[Launch]:
    """The kernel launches `launch(config)` makes, sized for `arch`."""
    sink: list[Launch] = []
    with _recording(arch, sink, case):
        launch(config)
    return sink


# ---- compiling one launch and reading the cubin -----------------------------------------------------------


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _specialize(launch: Launch, target):
    """Triton's own argument specialization (dtypes, 16-byte alignment and divisibility-by-16 hints, constexprs),
    as its JIT would derive it at a real launch of these arguments."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    if not hasattr(
        fn, "_pack_args"
    ):  # private JIT API (Triton 3.4 to 3.9 at least); a clear error if it moves
        raise RuntimeError(f"compile-check does not know this Triton's JIT internals ({triton_version()})")
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    return fn._pack_args(backend, launch.kwargs, bound_args, specialization, options)


def triton_version() -> str:
    import triton

    return triton.__version__


def _config_str(launch: Launch) -> str:
    kw = launch.kwargs
    blocks = [f"{k[6:]}={v}" for k, v in kw.items() if k.startswith("BLOCK_") and k != "BLOCK_D"]
    return " ".join([*blocks, f"w={kw.get('num_warps', 4)}", f"s={kw.get('num_stages', 3)}"])


def compile_launch(launch: Launch, arch: Arch, dtype: torch.dtype) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    programs = math.prod(launch.grid)
    res = Result(
        launch.case,
        launch.kernel.__name__,
        arch.cc,
        str(dtype).replace("torch.", ""),
        _config_str(launch),
        programs,
    )
    target = GPUTarget("cuda", arch.cc, 32)
    t0 = time.perf_counter()
    try:
        options, signature, constexprs, attrs = _specialize(launch, target)
        compiled = triton.compile(
            ASTSource(launch.kernel, signature, constexprs, attrs), target, options.__dict__
        )
    except Exception as e:  # noqa: BLE001 - a launch that does not compile is the finding, reported per row
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
        return res
    res.seconds = time.perf_counter() - t0
    res.shared = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    res.copy_bytes = dict(
        sorted(
            collections.Counter(
                int(w, 0) for w in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*, (\w+)", ptx)
            ).items()
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass, usage = _read_cubin(cubin)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m is None:
        res.error = f"could not read the resource usage from cuobjdump: {usage[:200]!r}"
        return res
    res.regs, res.spill_bytes = int(m[1]), int(m[2]) + int(m[3])
    res.hgmma = len(re.findall(r"\bHGMMA\.", sass))
    res.hmma = len(re.findall(r"\bHMMA\.", sass))
    loop = _main_loop(sass)
    res.loop_instructions, res.loop_i2f = len(loop), sum(op == "I2F" for op in loop)
    res.loop_spills = sum(op in ("LDL", "STL") for op in loop)
    threads = 32 * launch.kwargs.get("num_warps", 4)
    regs_per_warp = math.ceil(res.regs * 32 / 256) * 256  # allocated per warp in units of 256
    warps = threads // 32
    res.programs_per_sm = min(
        arch.regs_per_sm // (regs_per_warp * warps),
        arch.threads_per_sm // threads,
        arch.blocks_per_sm,
        arch.smem_per_sm // res.shared if res.shared else arch.blocks_per_sm,
    )
    res.waves = programs / (arch.sms * max(1, res.programs_per_sm))
    return res


def _read_cubin(cubin: Path) -> tuple[str, str]:
    """(SASS listing, resource usage) of a cubin, from cuobjdump."""

    def dump(flag: str) -> str:
        return subprocess.run(
            [_tool("cuobjdump"), flag, str(cubin)], capture_output=True, text=True, check=True
        ).stdout

    return dump("-sass"), dump("--dump-resource-usage")


def _main_loop(sass: str) -> list[str]:
    """Opcodes of the longest loop in a SASS listing: the span of its longest backward branch."""
    lines = [
        (int(addr, 16), op, text)
        for addr, text, op in re.findall(
            r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*);", sass
        )
    ]
    best = (0, -1)
    for addr, op, text in lines:
        target = re.search(r"\bBRA\s+0x([0-9a-f]+)", text) if op == "BRA" else None
        if target and int(target[1], 16) < addr and addr - int(target[1], 16) > best[1] - best[0]:
            best = (int(target[1], 16), addr)
    return [op for addr, op, _ in lines if best[0] <= addr <= best[1]]


# ---- the CUDA kernels (csrc/cuda/*.cu), compiled with nvcc ------------------------------------------------------
# H100 SXM: 4 warp-instructions issued per clock per SM at 1.98 GHz on 132 SMs, against 3.35 TB/s of HBM3.
H100_ISSUE_LANES_PER_CLOCK, H100_CLOCK_HZ, H100_SMS, H100_HBM_BYTES_PER_S = 128, 1.98e9, 132, 3.35e12
H100_HBM_BYTES_PER_CLOCK_PER_SM = H100_HBM_BYTES_PER_S / (H100_CLOCK_HZ * H100_SMS)  # ~12.8
GEMV_BYTES_PER_WEIGHT = {4: 0.5 + 2 / 128, 8: 1.0}  # int4 with fp16 g128 scales; int8 per channel
_DTYPES = {"6__half": "float16", "13__nv_bfloat16": "bfloat16"}  # template arguments as Itanium-mangled


@dataclasses.dataclass
class GemvLoop:
    dtype: str
    bits: int
    m_tiles: int  # n8 tiles of activation rows: 1 for M <= 8, 2 for M <= 16
    asym: bool
    regs: int
    spill_bytes: int
    loop_instructions: int
    hmma: int
    instructions_per_weight: (
        float  # per lane, over the main loop (an upper bound: it includes untaken branches)
    )
    issue_ceiling: float  # fraction of H100 HBM bandwidth that instruction issue allows (>= 1: not the bound)


@dataclasses.dataclass
class DecodeLoop:
    dtype: str
    head_dim: int
    head_tiles: int  # n8 tiles of query heads: 1 for up to 8 per KV head, 2 for up to 16
    regs: int
    spill_bytes: int
    loop_instructions: int  # per warp per 16-key step (an upper bound: it includes untaken branches)
    hmma: int
    issue_ceiling: float  # fraction of H100 HBM bandwidth that instruction issue allows (>= 1: not the bound)


def cuda_source(name: str) -> Path | None:
    """csrc/cuda/<name> of a source checkout (not part of an installed wheel)."""
    path = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / name
    return path if path.is_file() else None


def find_nvcc() -> str | None:
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return shutil.which("nvcc") or (str(cuda_home) if cuda_home.is_file() else None)


def _nvcc_functions(source: Path, arch: str) -> list[tuple[str, list[str], int, int]]:
    """(mangled name, main-loop opcodes, registers, spill bytes) of every kernel in a .cu file, compiled with
    setup.py's nvcc flags."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH or in $CUDA_HOME/bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernels.cubin"
        cmd = [
            nvcc,
            "-std=c++17",
            "-O3",
            "--use_fast_math",
            f"-I{source.parents[1]}",
            "-cubin",
            f"-arch={arch}",
        ]
        subprocess.run([*cmd, str(source), "-o", str(cubin)], check=True, capture_output=True, text=True)
        sass, usage = _read_cubin(cubin)
    resources = {
        m[1]: (int(m[2]), int(m[3]) + int(m[4]))
        for m in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    }
    out = []
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name = body.split("\n", 1)[0].strip()
        out.append((name, _main_loop(body), *resources.get(name, (0, 0))))
    return out


def cuda_gemv_loops(source: Path, arch: str = "sm_90a") -> list[GemvLoop]:
    """Compile the CUDA GEMV (quant_gemv.cu) with nvcc and measure each instantiation's main loop from the SASS.

    Each mma.m16n8k16 takes 16 x 16 weights of A over 32 lanes, 8 per lane, and with two n8 tiles every A
    fragment feeds two MMAs; so a loop with H HMMAs covers 8 * H / m_tiles weights per lane.
    """
    out = []
    for name, loop, regs, spill in _nvcc_functions(source, arch):
        # quant_gemv_kernel<T, BITS, M_TILES, ASYM>, e.g. ...kernelI6__halfLi4ELi1ELb0E...
        m = re.search(r"quant_gemv_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)ELb([01])E", name)
        if m is None:
            continue
        bits, m_tiles = int(m[2]), int(m[3])
        hmma = sum(op == "HMMA" for op in loop)
        weights = 8 * hmma / m_tiles
        ipw = len(loop) / weights if weights else math.inf
        need = H100_HBM_BYTES_PER_CLOCK_PER_SM / GEMV_BYTES_PER_WEIGHT[bits]  # weights/clk/SM
        ceiling = round(H100_ISSUE_LANES_PER_CLOCK / ipw / need, 2)
        out.append(
            GemvLoop(
                _DTYPES[m[1]],
                bits,
                m_tiles,
                m[4] == "1",
                regs,
                spill,
                len(loop),
                hmma,
                round(ipw, 2),
                ceiling,
            )
        )
    return sorted(out, key=lambda r: (r.bits, r.dtype, r.m_tiles, r.asym))


def cuda_decode_loops(source: Path, arch: str = "sm_90a") -> list[DecodeLoop]:
    """Compile the CUDA flash-decoding kernel (decode_attention.cu) with nvcc and measure each instantiation's
    main loop: one trip is one warp's 16-key step, which reads 16 keys x D x (K and V) x 2 bytes."""
    out = []
    for name, loop, regs, spill in _nvcc_functions(source, arch):
        # decode_kernel<T, D, HEAD_TILES>, e.g. ...decode_kernelI6__halfLi128ELi1EE...
        m = re.search(r"decode_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)E", name)
        if m is None:
            continue
        head_dim, head_tiles = int(m[2]), int(m[3])
        step_bytes = 16 * head_dim * 2 * 2  # 16 keys of K and V in fp16/bf16
        warp_issue_per_clock = H100_ISSUE_LANES_PER_CLOCK / 32
        issue_budget = warp_issue_per_clock * step_bytes / H100_HBM_BYTES_PER_CLOCK_PER_SM  # per step
        hmma = sum(op == "HMMA" for op in loop)
        ceiling = round(issue_budget / len(loop), 2) if loop else 0.0
        out.append(DecodeLoop(_DTYPES[m[1]], head_dim, head_tiles, regs, spill, len(loop), hmma, ceiling))
    return sorted(out, key=lambda r: (r.dtype, r.head_dim, r.head_tiles))


def default_config(key: str | None, arch: Arch) -> list[tuple[int, ...] | None]:
    """The built-in default for `key`; None (a kernel with one fixed launch config) -> [None]."""
    from .kernels import configs

    return [None] if key is None else [configs.defaults(arch.smem_per_block)[key]]


def check_launches(cases, archs, dtypes, config_of=default_config, log=print) -> list[Result]:
    """Compile every launch of every case for every arch and dtype, with the configs `config_of(key, arch)`."""
    results: list[Result] = []
    for arch in archs:
        for dtype in dtypes:
            for name, (key, launch) in cases(dtype).items():
                for cfg in config_of(key, arch):
                    for rec in record(name, launch, arch, cfg):
                        results.append(r := compile_launch(rec, arch, dtype))
                        log(_row(r))
    return results


# ---- checks and the report --------------------------------------------------------------------------------

_HEADER = (
    f"{'arch':5s} {'dtype':8s} {'kernel':17s} {'case':42s} {'config':28s} {'regs':>4s} {'spill':>5s} "
    f"{'smem KB':>7s} {'/SM':>3s} {'waves':>6s} {'MMA':>9s} {'loop':>4s} {'I2F':>3s} {'LDL/STL':>7s} "
    "cp.async bytes:count"
)


def _row(r: Result) -> str:
    head = (
        f"sm_{r.arch}{'a' if r.arch == 90 else ' '} {r.dtype:8s} {r.kernel:17s} {r.case:42s} {r.config:28s}"
    )
    if r.error:
        return f"{head} FAILED: {r.error}"
    mma = f"HGMMA {r.hgmma}" if r.hgmma else f"HMMA {r.hmma}" if r.hmma else "-"
    copies = " ".join(f"{w}:{n}" for w, n in r.copy_bytes.items()) or "-"
    return (
        f"{head} {r.regs:4d} {r.spill_bytes:5d} {r.shared / 1024:7.1f} {r.programs_per_sm:3d} {r.waves:6.2f} "
        f"{mma:>9s} {r.loop_instructions:4d} {r.loop_i2f:3d} {r.loop_spills:7d} {copies}"
    )


def problems(results: list[Result], defaults: bool = True) -> list[str]:
    """What fails the checks (see the module docstring). `defaults`: the configs are the shipped defaults, which
    must not spill (a tuning candidate may; tune then measures what it costs)."""
    out = []
    for r in results:
        what = f"{r.kernel} [{r.case}] {r.dtype} sm_{r.arch} {r.config}"
        if r.error:
            out.append(f"{what}: does not compile: {r.error}")
            continue
        if r.shared > ARCHS[r.arch].smem_per_block:
            out.append(f"{what}: {r.shared} B of shared memory > the {ARCHS[r.arch].smem_per_block} B limit")
        if defaults and r.loop_spills > MAX_LOOP_SPILL_FRACTION * r.loop_instructions:
            out.append(
                f"{what}: {r.loop_spills} of the main loop's {r.loop_instructions} instructions are spill "
                f"loads/stores ({r.spill_bytes} B of local memory)"
            )
        if (
            r.kernel in ("_attn_fwd_kernel", "_qmm_kernel")
            and r.dtype != "float32"
            and not (r.hgmma or r.hmma)
        ):
            out.append(f"{what}: no tensor-core instruction (HGMMA/HMMA) in the SASS")
        if r.kernel == "_qmm_kernel" and r.copy_bytes and min(r.copy_bytes) < 16 and r.dtype != "float32":
            out.append(f"{what}: global->shared copies narrower than 16 bytes {r.copy_bytes}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flashquant compile-check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--arch", type=int, nargs="*", choices=sorted(ARCHS), default=None, help="80 and/or 90")
    p.add_argument("--dtype", nargs="*", choices=("bfloat16", "float16"), default=None)
    p.add_argument("--candidates", action="store_true", help="every config tune tries, not just the defaults")
    p.add_argument("--cases", default="", help="only cases whose name contains this")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument(
        "--cuda",
        action="store_true",
        help="instead: compile the CUDA GEMV and decode kernels (csrc/cuda/*.cu) with nvcc for sm_90a and report "
        "their main loops",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.cuda:
        return _main_cuda(args.json)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # @triton.jit made interpreter objects at import; compiling needs the real ones: re-exec without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "flashquant", "compile-check", *argv], env)
    import triton

    from .tune import candidates

    archs = [ARCHS[a] for a in (args.arch or ([90] if args.candidates else [80, 89, 90]))]
    dtypes = [
        getattr(torch, d)
        for d in (args.dtype or (["bfloat16"] if args.candidates else ["bfloat16", "float16"]))
    ]
    if args.candidates:

        def config_of(key, arch):
            return [None] if key is None else candidates(key, smem_per_block=arch.smem_per_block)

    else:
        config_of = default_config

    def cases(dtype):
        return {n: c for n, c in _cases(dtype).items() if args.cases in n}

    print(
        f"Triton {triton.__version__}, ptxas {_tool('ptxas')}; compiling for {', '.join(a.name for a in archs)}"
    )
    print(_HEADER)
    results = check_launches(cases, archs, dtypes, config_of)
    found = problems(results, defaults=not args.candidates)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "triton": triton.__version__,
                    "results": [dataclasses.asdict(r) for r in results],
                    "problems": found,
                },
                indent=1,
            )
            + "\n"
        )
    print(f"\n{len(results)} launches compiled, {len(found)} problem(s)")
    for line in found:
        print(f"  {line}")
    return 1 if found else 0


def _table(header: tuple, widths: tuple, rows: list[tuple]) -> None:
    def line(cells) -> str:
        return " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))

    for cells in (header, *rows):
        print(line(cells))


def _main_cuda(json_path: Path | None) -> int:
    gemv, decode = cuda_source("quant_gemv.cu"), cuda_source("decode_attention.cu")
    if gemv is None or decode is None:
        print("compile-check --cuda needs a source checkout (csrc/cuda/*.cu)")
        return 1
    gemv_loops, decode_loops = cuda_gemv_loops(gemv), cuda_decode_loops(decode)
    found = []
    print(
        f"{gemv.name} on sm_90a: main loop per instantiation (instructions per weight are per lane, an upper bound)"
    )
    rows = []
    for r in gemv_loops:
        m = "<= 8" if r.m_tiles == 1 else "<= 16"
        rows.append((r.dtype, r.bits, m, str(r.asym), r.regs, r.spill_bytes, r.loop_instructions, r.hmma,
                     r.instructions_per_weight, f"{r.issue_ceiling:.0%}"))  # fmt: skip
        if r.issue_ceiling < 1 or r.spill_bytes or not r.hmma:
            found.append(f"{r}: instruction-bound below HBM peak, spilling, or no tensor cores")
    _table(("dtype", "bits", "M", "asym", "regs", "spill", "loop", "HMMA", "instr/w", "issue ceiling"),
           (9, 4, 5, 5, 4, 5, 5, 4, 7, 13), rows)  # fmt: skip
    print(f"\n{decode.name} on sm_90a: main loop (one warp's 16-key step) per instantiation")
    rows = []
    for r in decode_loops:
        heads = "<= 8" if r.head_tiles == 1 else "<= 16"
        rows.append((r.dtype, r.head_dim, heads, r.regs, r.spill_bytes, r.loop_instructions, r.hmma,
                     f"{r.issue_ceiling:.0%}"))  # fmt: skip
        if r.issue_ceiling < 1 or r.spill_bytes or not r.hmma:
            found.append(f"{r}: instruction-bound below HBM peak, spilling, or no tensor cores")
    _table(("dtype", "D", "Hq/Hkv", "regs", "spill", "loop", "HMMA", "issue ceiling"),
           (9, 4, 6, 4, 5, 5, 4, 13), rows)  # fmt: skip
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        rows = {
            "gemv": [dataclasses.asdict(r) for r in gemv_loops],
            "decode": [dataclasses.asdict(r) for r in decode_loops],
        }
        json_path.write_text(json.dumps(rows, indent=1) + "\n")
    n = len(gemv_loops) + len(decode_loops)
    print(f"\n{n} instantiations, {len(found)} problem(s)")
    for line in found:
        print(f"  {line}")
    return 1 if found or not gemv_loops or not decode_loops else 0


if __name__ == "__main__":
    sys.exit(main())
