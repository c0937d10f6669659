"""Glue between pytest-benchmark and flashquant.bench cases (imported by the bench/ test modules)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(benchmark, case):
    """Time one Case with pytest-benchmark (rotating its input sets); skip if the case cannot run here."""
    if case.unavailable:
        pytest.skip(f"{case.impl}: {case.unavailable}")
    fn, inputs = case.make()
    state = {"i": 0}

    def target():
        args = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        out = fn(*args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = case.group
    benchmark.extra_info.update(
        impl=case.impl,
        anchor=case.anchor,
        shape=case.shape,
        dtype=case.dtype,
        bytes=case.bytes,
        flops=case.flops,
    )
    benchmark.pedantic(target, rounds=20 if DEVICE == "cpu" else 100, warmup_rounds=3, iterations=1)
