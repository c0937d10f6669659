"""Cross-check flashquant.checkpoints against the tools that write the formats: AutoGPTQ's and AutoAWQ's own
packers (their QuantLinear.pack / WQLinear_GEMM.from_linear) pack weights that lie on a known grid, and
flashquant must read back exactly those weights (and, for GPTQ, write back exactly their tensors).

Not part of the test suite (it downloads two wheels, ~25 MB, and imports single modules from them without
installing them or their dependencies):

    .venv/bin/python scripts/crosscheck_gptq_awq.py [--dir /tmp/fq-crosscheck]
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import types
import zipfile

import torch
from torch import nn

from flashquant.checkpoints import from_awq, from_gptq, to_gptq
from flashquant.nn import QuantLinear

WHEELS = ("auto-gptq==0.7.1", "autoawq==0.2.7")


def fetch(where: str) -> None:
    if all(os.path.isdir(os.path.join(where, d)) for d in ("auto_gptq", "awq")):
        return
    os.makedirs(where, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "-d",
        where,
        *WHEELS,
    ]
    subprocess.run(cmd, check=True)
    for name in os.listdir(where):
        if name.endswith(".whl"):
            zipfile.ZipFile(os.path.join(where, name)).extractall(where)


def load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_grid(N, K, bits, group_size, symmetric, g_idx):
    """Codes, zero points and scales, and the weight they define: s * (code - zero)."""
    G = 1 if group_size == -1 else K // group_size
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (N, K))
    zeros = torch.full((N, G), 1 << (bits - 1)) if symmetric else torch.randint(1, maxq + 1, (N, G))
    scales = (torch.rand(N, G) * 0.02 + 0.005).half().float()
    return codes, zeros, scales, (codes - zeros[:, g_idx]).float() * scales[:, g_idx]


def in_original_order(qw, perm):
    return QuantLinear.from_quantized(qw, None, perm).dequantize(torch.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/fq-crosscheck")
    args = parser.parse_args()
    fetch(args.dir)
    torch.manual_seed(0)
    gptq = {
        "qlinear_cuda_old": load("gptq_old", f"{args.dir}/auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py"),
        "qlinear_cuda": load("gptq_new", f"{args.dir}/auto_gptq/nn_modules/qlinear/qlinear_cuda.py"),
    }
    sys.modules.setdefault("accelerate", types.ModuleType("accelerate"))  # imported, not used, by awq.utils
    package = types.ModuleType("awq")
    package.__path__ = [f"{args.dir}/awq"]
    sys.modules["awq"] = package
    gemm = load("awq_gemm", f"{args.dir}/awq/modules/linear/gemm.py")
    N, K, failures, cases = 96, 256, 0, 0
    for kind, module in gptq.items():
        for bits in (4, 8):
            for group_size in (32, 64, 128, -1):
                for symmetric in (True, False):
                    for act_order in (False, True) if kind == "qlinear_cuda" else (False,):
                        G = 1 if group_size == -1 else K // group_size
                        g_idx = torch.arange(K) // (K // G)
                        if act_order:
                            g_idx = g_idx[torch.randperm(K)]
                        codes, zeros, scales, w = on_grid(N, K, bits, group_size, symmetric, g_idx)
                        linear = nn.Linear(K, N, bias=False)
                        linear.weight.data = w.clone()
                        packed = module.QuantLinear(bits, group_size, K, N, False)
                        extra = (g_idx.int(),) if kind == "qlinear_cuda" else (None,)
                        packed.pack(linear, scales.clone(), zeros.clone(), *extra)
                        qw, perm = from_gptq(
                            packed.qweight, packed.qzeros, packed.scales, packed.g_idx, bits=bits
                        )
                        ok = torch.equal(in_original_order(qw, perm), w) and (qw.zeros is None) == symmetric
                        # and back: flashquant's writer gives their tensors, word for word
                        written = to_gptq(qw, perm)
                        ok &= all(
                            torch.equal(written[n], getattr(packed, n).to(written[n].dtype))
                            for n in ("qweight", "qzeros", "scales")
                        )
                        ok &= group_size == -1 or torch.equal(written["g_idx"], packed.g_idx.int())
                        failures += not ok
                        cases += 1
                        print(f"AutoGPTQ {kind} int{bits} group {group_size} sym={symmetric} act_order={act_order}:",
                              "exact, both ways" if ok else "MISMATCH")  # fmt: skip
    for group_size in (32, 64, 128, -1):
        G = 1 if group_size == -1 else K // group_size
        codes, zeros, scales, w = on_grid(N, K, 4, group_size, False, torch.arange(K) // (K // G))
        linear = nn.Linear(K, N, bias=False)
        linear.weight.data = w.clone()
        packed = gemm.WQLinear_GEMM.from_linear(
            linear, 4, K // G, scales=scales.t().contiguous(), zeros=zeros.t().contiguous().float()
        )
        qw = from_awq(packed.qweight, packed.qzeros, packed.scales)
        theirs = gemm.dequantize_gemm(packed.qweight, packed.qzeros, packed.scales, 4, K // G).float().t()
        ok = torch.equal(qw.dequantize(torch.float32), w) and torch.equal(
            qw.dequantize(torch.float16).float(), theirs
        )
        failures += not ok
        cases += 1
        print(
            f"AutoAWQ GEMM int4 group {group_size}: {'exact' if ok else 'MISMATCH'} (also vs its dequantize_gemm)"
        )
    print(f"{cases - failures}/{cases} exact")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
