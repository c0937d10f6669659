import pytest

from bench_utils import DEVICE, run_case
from flashquant.bench.cases import GPU_MS, LLAMA3_8B_LINEARS, quant_matmul_cases

if DEVICE == "cpu":
    CASES = quant_matmul_cases("cpu", [(4096, 4096), (14336, 4096)], [1, 4])
else:
    CASES = quant_matmul_cases("cuda", LLAMA3_8B_LINEARS, GPU_MS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.group}|{c.impl}")
def test_quant_matmul(benchmark, case):
    run_case(benchmark, case)
