"""Quantization accuracy of each format and `quantize` method, recorded: weight and layer-output SQNR, and the time
`quantize` takes.

``python -m flashquant.bench.accuracy [--json FILE] [--device cpu|cuda] [--shape N K]`` quantizes seeded random
weights of a Llama-3-8B shape (4096 x 4096 by default) drawn from three distributions (Gaussian, Laplace and
Student-t with 3 degrees of freedom: real checkpoints' rows lie between the first and the last; nothing is
downloaded, so no real checkpoint is measured) with every format (int4 / int8, group sizes, symmetric or not) and
every method ("minmax", "mse", "gptq", and "gptq-act": GPTQ with act_order=True), and prints a table:

* weight SQNR (dB) = 10 log10(|W|^2 / |W - dequantize(quantize(W))|^2), in fp32;
* output SQNR (dB): the same for x @ W^T on 512 held-out input rows x;
* quantize time (s), one call, weights in bf16 on `--device`, after a warm-up on a small matrix.

Inputs: rows near a 64-dimensional subspace plus 5% noise, channel magnitudes e^N(0,1), the structure of LLM
activations that GPTQ exploits (isotropic inputs would leave it nothing to exploit); GPTQ's X^T X comes from 4096
other rows of the same distribution.
"""

from __future__ import annotations

import argparse
import time

import torch

# Row label -> quantize() options ("gptq-act": GPTQ with act_order=True).
METHODS = {
    "minmax": dict(method="minmax"),
    "mse": dict(method="mse"),
    "gptq": dict(method="gptq"),
    "gptq-act": dict(method="gptq", act_order=True),
}
FORMATS = [(4, 32), (4, 128), (4, -1), (8, 128), (8, -1)]  # (bits, group_size)
DISTRIBUTIONS = {
    "gaussian": lambda shape, g: torch.randn(shape, generator=g),
    "laplace": lambda shape, g: _laplace(shape, g),
    "student-t3": lambda shape, g: _student_t(shape, 3, g),
}


def _laplace(shape, g):
    u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def _student_t(shape, dof: int, g):
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    chi2 = torch.randn((dof, *shape), generator=g, dtype=torch.float64).square().sum(0)
    return (z / torch.sqrt(chi2 / dof)).float()


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10(ref.square().sum() / (ref - approx).square().sum()))


def correlated_inputs(k: int, g: torch.Generator, rank: int = 64):
    """A sampler of (n, k) input rows: near a fixed `rank`-dimensional subspace, fixed channel magnitudes."""
    basis = torch.randn(rank, k, generator=g) / rank**0.5
    channel = torch.exp(torch.randn(k, generator=g))
    return lambda n: (
        (torch.randn(n, rank, generator=g) @ basis + 0.05 * torch.randn(n, k, generator=g)) * channel
    )


def measure(n: int, k: int, device: str, seed: int = 0) -> list[dict]:
    import flashquant as fq

    rows = []
    fq.quantize(torch.randn(64, 256, device=device), 4, 32, method="mse")  # warm-up (first-call costs)
    for dist, draw in DISTRIBUTIONS.items():
        g = torch.Generator().manual_seed(seed)
        w = draw((n, k), g).to(device=device, dtype=torch.bfloat16)
        inputs = correlated_inputs(k, g)
        calib, x = inputs(4096).to(device), inputs(512).to(device)
        hessian = calib.T @ calib
        w32 = w.float()
        out_ref = x @ w32.t()
        for bits, group_size in FORMATS:
            for symmetric in (True, False):
                for method, options in METHODS.items():
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    gptq = options["method"] == "gptq"
                    qw = fq.quantize(
                        w, bits, group_size, symmetric, **options, hessian=hessian if gptq else None
                    )
                    if device == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - t0
                    deq = qw.dequantize(torch.float32)
                    rows.append(
                        dict(
                            distribution=dist,
                            bits=bits,
                            group_size=group_size,
                            symmetric=symmetric,
                            method=method,
                            weight_sqnr_db=sqnr_db(w32, deq),
                            output_sqnr_db=sqnr_db(out_ref, x @ deq.t()),
                            quantize_s=seconds,
                        )
                    )
    return rows


def table(rows: list[dict]) -> str:
    """One line per (distribution, format): each method's weight SQNR, output SQNR and quantize time."""
    cols = " ".join(f"{m:>8s}" for m in METHODS)
    width = 9 * len(METHODS) - 1
    lines = [
        f"{'weights':11s} {'format':22s} {'weight SQNR dB':>{width}s} {'output SQNR dB':>{width}s}"
        f" {'quantize s':>{width}s}",
        f"{'':11s} {'':22s} {cols} {cols} {cols}",
    ]
    by_key = {}
    for r in rows:
        key = (r["distribution"], r["bits"], r["group_size"], r["symmetric"])
        by_key.setdefault(key, {})[r["method"]] = r
    for (dist, bits, gs, sym), m in by_key.items():
        fmt = f"int{bits} {'per-channel' if gs == -1 else f'g{gs}'} {'sym' if sym else 'asym'}"
        cells = [
            f"{m[x][key]:8.2f}" for key in ("weight_sqnr_db", "output_sqnr_db", "quantize_s") for x in METHODS
        ]
        lines.append(f"{dist:11s} {fmt:22s} {' '.join(cells)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashquant.bench.accuracy", description=__doc__)
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--shape", nargs=2, type=int, default=(4096, 4096), metavar=("N", "K"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows, with the environment and commit, to this file")
    args = ap.parse_args(argv)
    n, k = args.shape
    print(f"quantization accuracy: {n} x {k} bf16 weights on {args.device}, seed {args.seed}")
    rows = measure(n, k, args.device, args.seed)
    print(table(rows))
    if args.json:
        from .harness import write_run

        write_run(args.json, args.device, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
