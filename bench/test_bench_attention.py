import pytest
import torch

from bench_utils import run_case
from flashquant.bench.cases import decode_cases, prefill_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA GPU")

PREFILL = prefill_cases("cuda", [512, 1024, 2048, 4096, 8192, 16384], [64, 128])
DECODE = decode_cases("cuda", [1, 8, 32, 64], [1024, 8192, 32768, 131072])


@pytest.mark.parametrize("case", PREFILL, ids=lambda c: f"{c.group}|{c.impl}")
def test_prefill(benchmark, case):
    run_case(benchmark, case)


@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"{c.group}|{c.impl}")
def test_decode(benchmark, case):
    run_case(benchmark, case)
