"""python -m flashquant tune: choose the Triton kernels' launch configs on this device by measurement.

For every config key (see flashquant/kernels/configs.py) it runs each candidate config on a representative
Llama-3 shape, rejects candidates that fail to compile or whose error against the fp32 reference exceeds
twice the default config's (plus one output rounding), times the rest with the benchmark harness (CUDA events;
quantized weights rotated past the L2 cache), and writes the fastest per key, with the default's time beside
it, to ``<out>/<device>.json``. Keys it did not reach before ``--max-minutes`` keep the default. The launchers
pick the table up on the next process start (see configs.py for where they look).

  python -m flashquant tune                          # every key, full candidate sets, on the GPU
  python -m flashquant tune --keys 'attention.*'     # a subset (fnmatch patterns), merged into the table
  python -m flashquant tune --quick --out DIR        # tiny shapes, two candidates a key: a dry run that also
                                                     # works on a CPU under the Triton interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# bf16 on a GPU (the Llama default); the interpreter cannot do bf16 arithmetic, so fp16 there.
_ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-20}


@dataclasses.dataclass
class Task:
    key: str
    shape: str
    candidates: list[tuple[int, ...]]
    run: Callable[[tuple[int, ...] | None], list[torch.Tensor]]  # config -> outputs (one per sampled shape)
    refs: list[torch.Tensor]  # fp32 reference outputs, same order
    timed: Callable[[tuple[int, ...]], list[tuple[Callable, list[tuple]]]]  # config -> [(fn, rotated inputs)]


def _attention_tasks(device, dtype, quick: bool, wanted) -> Iterator[Task]:
    """Built lazily, one key at a time, so unwanted keys cost nothing and only one key's inputs are alive."""
    from .kernels import attention as tri
    from .kernels import configs
    from .reference import attention as ref

    smem = configs.device_smem(device)

    for d in (64, 128, 256):
        scale = 1.0 / math.sqrt(d)
        if wanted(f"attention.prefill.d{d}"):  # Llama-3-8B heads (32 query / 8 KV), causal, 4k tokens
            b, s, hq, hkv = (1, 80, 4, 2) if quick else (1, 4096, 32, 8)
            q = torch.randn(b, s, hq, d, device=device, dtype=dtype)
            k, v = (torch.randn(b, s, hkv, d, device=device, dtype=dtype) for _ in range(2))

            def prefill(cfg, q=q, k=k, v=v, scale=scale):
                return tri.attention_dense(q, k, v, True, scale, (-1, -1), 0.0, False, config=cfg)[0]

            ref_out = ref.attention_ref(q.float(), k.float(), v.float(), causal=True)[0]
            shape = f"B={b} S={s} Hq={hq} Hkv={hkv} D={d} causal"
            yield _one_launch_task(f"attention.prefill.d{d}", shape, quick, smem, prefill, ref_out)
        if wanted(f"attention.decode.d{d}"):  # one new token per sequence, full 8k caches, batch 8
            b, cap, hq, hkv = (2, 96, 4, 2) if quick else (8, 8192, 32, 8)
            q1 = torch.randn(b, 1, hq, d, device=device, dtype=dtype)
            kc, vc = (torch.randn(b, cap, hkv, d, device=device, dtype=dtype) for _ in range(2))
            lens = torch.full((b,), cap, dtype=torch.int32, device=device)

            def decode(cfg, q1=q1, kc=kc, vc=vc, lens=lens, scale=scale):
                args = (q1, kc, vc, lens, None, True, scale, (-1, -1), 0.0, False, 0)
                return tri.attention_kvcache(*args, config=cfg)[0]

            ref_out = ref.attention_ref(q1.float(), kc.float(), vc.float(), causal=True)[0]
            shape = f"B={b} Sq=1 cache={cap} Hq={hq} Hkv={hkv} D={d}"
            yield _one_launch_task(f"attention.decode.d{d}", shape, quick, smem, decode, ref_out)


def _one_launch_task(key, shape, quick, smem, launch, ref_out) -> Task:
    """A task timing one launch on fixed inputs (attention is compute-bound or reads >> L2: no rotation)."""
    return Task(
        key,
        shape,
        candidates(key, quick, smem),
        lambda cfg: [launch(cfg)],
        [ref_out],
        lambda cfg: [(lambda: launch(cfg), [()])],
    )


def _quant_matmul_tasks(device, dtype, quick: bool, wanted) -> Iterator[Task]:
    """Llama-3-8B's gate/up projection (N=14336, K=4096), g128, at two M per bucket; weights rotated past L2."""
    from . import quant as fq
    from .bench.harness import cache_bytes, copies_for
    from .kernels import configs
    from .kernels.quant_matmul import quant_matmul_triton
    from .reference.quant import quant_matmul_ref

    n, k, group = (72, 256, 128) if quick else (14336, 4096, 128)
    # mbig: the M the fused kernel's big-tile bucket still serves. From DEQUANT_GEMM_MIN_M (int4 512, int8 128) the
    # launcher dequantizes and calls cuBLAS instead; the first H100 table's mbig entries were tuned at 512 / 4096.
    ms = (
        {"m16": (3,), "m64": (40,), "mbig": (80,)}
        if quick
        else {"m16": (1, 16), "m64": (32, 64), "mbig": (128, 256)}
    )
    for bits in (4, 8):
        qw = None  # built for the first wanted bucket of this bit width, shared by the others
        for bucket in ms:
            if not wanted(f"quant_matmul.int{bits}.{bucket}"):
                continue
            if qw is None:
                qw = fq.quantize(torch.randn(n, k, device=device, dtype=dtype), bits, group)
                n_copies = 1 if quick else copies_for(qw.nbytes, cache_bytes(device.type))
                copies = [qw] + [
                    fq.QuantizedWeight(
                        qw.qdata.clone(), qw.scales.clone(), None, bits, group, qw.shape, dtype
                    )
                    for _ in range(n_copies - 1)
                ]
                codes = qw.codes()
            xs = [torch.randn(m, k, device=device, dtype=dtype) for m in ms[bucket]]

            def launch(x, w, cfg, bits=bits):  # the fused kernel: the configs being tuned are its own
                return quant_matmul_triton(
                    x, w.qdata, w.scales, None, bits, group, config=cfg, strategy="fused"
                )

            yield Task(
                f"quant_matmul.int{bits}.{bucket}",
                f"N={n} K={k} g{group} M in {ms[bucket]}",
                candidates(f"quant_matmul.int{bits}.{bucket}", quick, configs.device_smem(device)),
                lambda cfg, xs=xs, qw=qw, f=launch: [f(x, qw, cfg) for x in xs],
                [quant_matmul_ref(x.float(), codes, qw.scales.float(), None, bits, group) for x in xs],
                lambda cfg, xs=xs, f=launch, copies=copies: [
                    (lambda x, w, cfg=cfg, f=f: f(x, w, cfg), [(x, w) for w in copies]) for x in xs
                ],
            )


# The space searched per key: the product of these value lists, in the order of the key's config tuple.
_SPACES = {
    "attention.prefill": ((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)),  # BLOCK_M, BLOCK_N, warps, stages
    "attention.decode": ((32, 64, 128), (2, 4, 8), (2, 3, 4)),  # BLOCK_N, warps, stages
    "quant_matmul.m16": ((16,), (32, 64, 128), (64, 128), (2, 4, 8), (2, 4)),  # BLOCK_M/N/K, warps, stages
    "quant_matmul.m64": ((32, 64), (64, 128), (64, 128), (4,), (2, 3, 4)),
    "quant_matmul.mbig": ((64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4)),
}


def candidates(key: str, quick: bool = False, smem_per_block: int | None = None) -> list[tuple[int, ...]]:
    """The configs tried for `key`: the default (for a device with `smem_per_block`; see configs.defaults)
    first, as the baseline, then the rest of its space; --quick keeps one more, to exercise the choice."""
    from .kernels import configs

    default = tuple(configs.defaults(smem_per_block)[key])
    kernel, regime, bucket = key.split(".")  # attention.prefill.d128 / quant_matmul.int4.m16
    space = _SPACES[f"{kernel}.{bucket}" if kernel == "quant_matmul" else f"{kernel}.{regime}"]
    rest = [c for c in itertools.product(*space) if c != default]
    return [default, *(rest[:1] if quick else rest)]


def _max_err(outs, refs) -> float:
    errs = [float((o.float() - r).abs().max()) if o.numel() else 0.0 for o, r in zip(outs, refs)]
    if any(math.isnan(e) for e in errs):
        return math.inf
    return max(errs)


def _time(device, timed_pairs, quick: bool) -> float:
    """Geometric mean over the sampled shapes of the median time (ms)."""
    from .bench.harness import time_cpu, time_cuda

    logs = []
    for fn, inputs in timed_pairs:
        if device.type == "cuda":
            t = time_cuda(fn, inputs, warmup=5, reps=30)
        else:
            t = time_cpu(fn, inputs, warmup=0, reps=1 if quick else 5)
        logs.append(math.log(max(t.median_ms, 1e-6)))
    return math.exp(sum(logs) / len(logs))


def tune_task(task: Task, device, dtype, quick: bool = False, log=print) -> dict:
    scale = max(float(r.abs().max()) for r in task.refs) or 1.0
    floor = 2 * _ROUNDING[dtype] * scale
    results, rejected = [], {}
    tol = None
    for i, cfg in enumerate(task.candidates):
        try:
            err = _max_err(task.run(cfg), task.refs)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile (shared memory, registers) is skipped
            rejected[str(list(cfg))] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            continue
        # the first candidate is the default: its error sets the bar (or, if it failed, 4 output roundings)
        if tol is None:
            tol = 2 * err + floor if i == 0 else 4 * floor
        if not err <= tol:
            rejected[str(list(cfg))] = f"error {err:.3g} > {tol:.3g}"
            continue
        results.append((_time(device, task.timed(cfg), quick), cfg, err))
        if device.type == "cuda":
            torch.cuda.synchronize()
    default = task.candidates[0]
    default_ms = next((ms for ms, cfg, _ in results if cfg == default), None)
    entry = {
        "shape": task.shape,
        "default": list(default),
        "default_ms": default_ms,
        "tried": len(task.candidates),
    }
    if rejected:
        entry["rejected"] = rejected
    if not results:
        log(f"  {task.key}: every candidate failed; keeping the default")
        return entry
    best_ms, best, best_err = min(results, key=lambda r: r[0])
    entry.update(config=list(best), ms=round(best_ms, 5), max_err=best_err)
    if default_ms:
        entry["default_ms"] = round(default_ms, 5)
        entry["speedup_vs_default"] = round(default_ms / best_ms, 3)
    log(
        f"  {task.key:32s} {list(best)!s:24s} {best_ms:9.4f} ms"
        + (
            f"  (default {list(default)} {default_ms:.4f} ms, {default_ms / best_ms:.2f}x)"
            if default_ms
            else ""
        )
        + f"  [{len(results)} ok, {len(rejected)} rejected]"
    )
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashquant tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", nargs="*", default=["*"], help="fnmatch patterns of config keys (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and two candidates per key (a dry run)")
    p.add_argument("--out", type=Path, default=None, help="directory for <device>.json (default: user cache)")
    p.add_argument("--max-minutes", type=float, default=9.0, help="stop starting new keys after this long")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and args.out is None:
        print("no CUDA device: interpreter timings say nothing about a GPU, so pass --out DIR for a dry run")
        return 2
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before triton is imported (importing flashquant already did): re-exec.
        print("no CUDA device: re-running under the Triton interpreter (TRITON_INTERPRET=1)", flush=True)
        cmd = [sys.executable, "-m", "flashquant", "tune", *argv]
        os.execve(sys.executable, cmd, {**os.environ, "TRITON_INTERPRET": "1"})
    from .kernels import configs

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float16
    out_dir = args.out or configs.user_dir()
    key = configs.device_key(device)
    unknown = [pat for pat in args.keys if not fnmatch.filter(configs.DEFAULTS, pat)]
    if unknown:
        print(f"no config key matches {unknown}; keys are: {', '.join(configs.DEFAULTS)}")
        return 2

    start = time.monotonic()
    skipped = []

    def wanted(name: str) -> bool:
        """Matches --keys and is reached before --max-minutes (checked before its inputs are built)."""
        if not any(fnmatch.fnmatch(name, pat) for pat in args.keys):
            return False
        if time.monotonic() - start > 60 * args.max_minutes:
            skipped.append(name)
            return False
        return True

    torch.manual_seed(0)
    builders = (_attention_tasks, _quant_matmul_tasks)
    path = out_dir / f"{key}.json"
    table = json.loads(path.read_text()) if path.is_file() else {"configs": {}}
    print(f"tuning on {key} ({dtype}), writing {path}")

    def save() -> None:  # after every key: a run stopped from outside keeps the keys it finished
        table.update(_environment(device, dtype, args.quick))
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        configs.clear_cache()

    try:
        for build in builders:
            for task in build(device, dtype, args.quick, wanted):
                table["configs"][task.key] = tune_task(task, device, dtype, args.quick)
                save()
    except KeyboardInterrupt:
        print(f"interrupted; {path} keeps the keys finished so far")
        return 130
    save()
    if skipped:
        print(
            f"out of time (--max-minutes {args.max_minutes}); not tuned, still default: {', '.join(skipped)}"
        )
    print(f"wrote {path}")
    return 0


def _environment(device, dtype, quick: bool) -> dict:
    import triton

    from .bench.harness import _git_commit, source_digest

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "Triton interpreter (CPU)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype).replace("torch.", ""),
        "quick": quick,
        "git_commit": _git_commit(),
        "source_digest": source_digest(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


if __name__ == "__main__":
    sys.exit(main())
