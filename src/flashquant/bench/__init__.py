"""flashquant's benchmark suite: ``python -m flashquant.bench --help``."""

from .cases import Case, decode_cases, prefill_cases, preset, quant_matmul_cases
from .harness import Timing, environment, time_cpu, time_cuda, time_fn
from .report import compare, markdown, plots, run_cases, table, write_json

__all__ = [
    "Case",
    "Timing",
    "compare",
    "decode_cases",
    "environment",
    "markdown",
    "plots",
    "prefill_cases",
    "preset",
    "quant_matmul_cases",
    "run_cases",
    "table",
    "time_cpu",
    "time_cuda",
    "time_fn",
    "write_json",
]
