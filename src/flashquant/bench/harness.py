"""Timing harness shared by the CLI (python -m flashquant.bench) and the pytest-benchmark cases in bench/.

* CUDA: CUDA events around each repetition (optionally one CUDA-graph replay per repetition, to separate launch
  overhead), after warm-up; inputs are rotated through enough copies that the working set exceeds the L2 cache,
  so memory-bound kernels are measured cold.
* CPU: wall clock around each repetition, inputs rotated through a set larger than the last-level cache; the
  implementations of one group are timed in turn, one repetition each per round in a shuffled order
  (time_cpu_interleaved), so the host's drift falls on all of them alike.
Every measurement keeps the raw repetition times; the report derives median, spread, GB/s and TFLOP/s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import torch

import flashquant as fq


@dataclasses.dataclass
class Timing:
    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def spread_ms(self) -> tuple[float, float]:
        """(10th, 90th) percentile."""
        t = sorted(self.times_ms)
        return t[int(0.1 * (len(t) - 1))], t[int(0.9 * (len(t) - 1))]


def copies_for(bytes_per_copy: int, cache_bytes: int, max_total: int = 2 << 30) -> int:
    """How many input copies to rotate so the set exceeds 2x the cache (at least 2, memory permitting)."""
    if bytes_per_copy <= 0:
        return 1
    want = max(2, -(-2 * cache_bytes // bytes_per_copy))
    return max(1, min(want, max_total // bytes_per_copy))


def time_cpu(fn: Callable, inputs: Sequence[tuple], warmup: int = 3, reps: int = 30) -> Timing:
    (t,) = time_cpu_interleaved([(fn, inputs)], warmup=warmup, reps=reps)
    if isinstance(t, Exception):
        raise t
    return t


def time_cpu_interleaved(
    runs: Sequence[tuple[Callable, Sequence[tuple]]], warmup: int = 3, reps: int = 30
) -> list[Timing | Exception]:
    """Time several implementations of one computation, `runs` = [(fn, rotated input sets), ...], by rounds: each
    round times one repetition of every implementation, in an order shuffled per round (seeded: runs repeat). A
    shared host drifts by 15-30% over the seconds a group takes (its clock, its neighbours); timed in turn, every
    implementation sees the same drift, where timed one after the other, whichever ran during a slow stretch would
    carry all of it. The order is shuffled because a call also pays for the one before it (the caches it left, a
    core still clocked down after AMX or AVX-512 work): in a fixed order each implementation would always follow
    the same neighbour. Returns one Timing per run, or the exception that run raised (in warm-up or in any
    repetition; it is then left out of the remaining rounds, the others go on)."""
    times: list[list[float]] = [[] for _ in runs]
    failed: list[Exception | None] = [None] * len(runs)
    for j, (fn, inputs) in enumerate(runs):
        try:
            for i in range(warmup):
                fn(*inputs[i % len(inputs)])
        except Exception as e:
            failed[j] = e
    order = list(range(len(runs)))
    shuffle = random.Random(0).shuffle
    for i in range(reps):
        shuffle(order)
        for j in order:
            if failed[j] is not None:
                continue
            fn, inputs = runs[j]
            args = inputs[i % len(inputs)]
            try:
                t0 = time.perf_counter()
                fn(*args)
                times[j].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:
                failed[j] = e
    return [e if e is not None else Timing(t) for e, t in zip(failed, times)]


def time_cuda(
    fn: Callable, inputs: Sequence[tuple], warmup: int = 10, reps: int = 100, graph: bool = False
) -> Timing:
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    if graph:  # one graph per input set, replayed: no launch overhead in the timed region
        graphs = []
        for args in inputs:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(*args)
            graphs.append(g)
        run = [g.replay for g in graphs]
    else:
        run = [functools.partial(fn, *args) for args in inputs]
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        run[i % len(run)]()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)])


DEFAULT_REPS = {"cuda": 100, "cpu": 30}  # repetitions per case when the caller gives none


def time_fn(device: str, fn, inputs, reps: int | None = None, graph: bool = False) -> Timing:
    if device == "cuda":
        return time_cuda(fn, inputs, reps=reps or DEFAULT_REPS["cuda"], graph=graph)
    return time_cpu(fn, inputs, reps=reps or DEFAULT_REPS["cpu"])


# ---- the machine ------------------------------------------------------------------------------------------
def cache_bytes(device: str) -> int:
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    try:
        idx = max(
            int(p.split("index")[-1])
            for p in os.listdir("/sys/devices/system/cpu/cpu0/cache")
            if "index" in p
        )
        with open(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size") as f:
            s = f.read().strip()
        return int(s[:-1]) * (1 << 10 if s.endswith("K") else 1 << 20) if s[-1] in "KM" else int(s)
    except (OSError, ValueError):
        return 32 << 20


@functools.cache
def measured_bandwidth_gbs(device: str) -> float:
    """Read bandwidth measured now: CPU, a sum over 256 MB; CUDA, a 1 GB device-to-device copy (read + write)."""
    if device == "cuda":
        a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
        b = torch.empty_like(a)
        t = time_cuda(lambda: b.copy_(a), [()], reps=20)
        return 2 * a.numel() * 2 / (t.median_ms * 1e-3) / 1e9
    a = torch.ones(1 << 26, dtype=torch.float32)  # 256 MB
    t = time_cpu(lambda: a.sum(), [()], reps=10)
    return a.numel() * 4 / (t.median_ms * 1e-3) / 1e9


# Datasheet peaks used for "% of peak" (device name substring -> (GB/s, dense bf16 TFLOP/s)).
PEAKS = {"H100": (3350.0, 989.0), "H200": (4800.0, 989.0), "A100": (2039.0, 312.0)}


def environment(device: str) -> dict:
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{_cpu_model()} x{os.cpu_count()}",
        "device_kind": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "source_digest": source_digest(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "measured_bandwidth_gbs": round(measured_bandwidth_gbs(device), 1),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cpu":
        env["cpu_model"] = _cpu_model()
        env["llc_bytes"] = cache_bytes("cpu")
        # the C++ kernels' instruction-set path (FLASHQUANT_CPU_SIMD caps it)
        env["cpu_simd"] = torch.ops.flashquant.cpu_simd_level() if fq.backends()["cpu"].available else None
    else:
        env["l2_bytes"] = cache_bytes("cuda")
        for key, (bw, tf) in PEAKS.items():
            if key in env["device"]:
                env["peak_bandwidth_gbs"], env["peak_bf16_tflops"] = bw, tf
    return env


def write_run(path: str, device: str, args, rows: list) -> None:
    """A recorded run as JSON: the environment (device, versions, commit), the command's arguments, the rows."""
    run = {"environment": environment(device), "args": vars(args), "results": rows}
    with open(path, "w") as f:
        json.dump(run, f, indent=1)
    print(f"wrote {path}")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, timeout=5, cwd=os.path.dirname(__file__)
    ).stdout.strip()


def _git_commit() -> str | None:
    """HEAD's short hash, with "-dirty" when tracked files differ from it. A copy of the tree whose .git is stale
    (a lent GPU's copy of a checkout) then says so; source_digest() identifies the code exactly."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        if not head:
            return None
        return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


SOURCE_SUFFIXES = (".py", ".json", ".cpp", ".cu", ".cuh", ".h")


def source_digest(package_dir: str | None = None) -> str:
    """sha256 (first 12 hex digits) of flashquant's sources: the package's .py/.json files and, in a source
    checkout, csrc/. Recomputed on any checkout (`python -c "from flashquant.bench.harness import source_digest;
    print(source_digest())"`), it says which commit a result file's code was, whatever its git_commit field says."""
    root = package_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = [root, os.path.join(root, "..", "..", "csrc")]
    h = hashlib.sha256()
    for base in dirs:
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base):  # top-down: pruning and sorting dirnames in place
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")  # fixes the order of the walk
            for name in sorted(f for f in filenames if f.endswith(SOURCE_SUFFIXES)):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, base).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:12]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return re.sub(r"\((R|TM)\)", "", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor()
