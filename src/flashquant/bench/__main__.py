"""python -m flashquant.bench [--quick | --llama3-8b | --llama3-70b | --preset smoke|crossover] [--ops ...]
                             [--out DIR] [--graph] [--reps N] [--compare OLD.json NEW.json] [--markdown RUN.json]
                             [--plots RUN.json]

Runs flashquant's kernels next to their anchors (what you would use instead) in one run, prints a table,
and writes JSON + PNG plots to bench/results/<device>/ (or --out)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from .cases import preset
from .report import compare, markdown, plots, run_cases, table, write_json


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "device"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flashquant.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick")
    g.add_argument("--llama3-8b", dest="preset", action="store_const", const="llama3-8b")
    g.add_argument("--llama3-70b", dest="preset", action="store_const", const="llama3-70b")
    g.add_argument(
        "--preset", dest="preset", choices=["smoke", "quick", "llama3-8b", "llama3-70b", "crossover"]
    )
    ap.add_argument(
        "--ops", nargs="+", choices=["quant_matmul", "prefill", "decode", "varlen"], help="only these ops"
    )
    ap.add_argument("--impl", help="only implementations whose name contains this (anchors are always kept)")
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--reps", type=int, help="repetitions per case (default 100 on CUDA, 30 on CPU)")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    ap.add_argument(
        "--max-minutes",
        type=float,
        help="start no case after this long; the rest are recorded as not run (as after Ctrl-C / SIGINT)",
    )
    ap.add_argument("--out", help="output directory (default bench/results/<device>)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--compare", nargs=2, metavar=("OLD", "NEW"), help="print regressions between two JSON runs"
    )
    ap.add_argument("--markdown", metavar="RUN.json", help="print a markdown summary table of a JSON run")
    ap.add_argument("--group", help="with --markdown: only groups whose name contains this (e.g. 'M=1 ')")
    ap.add_argument("--plots", metavar="RUN.json", help="(re)draw a JSON run's plots next to it")
    args = ap.parse_args(argv)

    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f), args.group))
        return 0
    if args.plots:
        with open(args.plots) as f:
            run = json.load(f)
        stem = os.path.splitext(args.plots)[0]
        print(
            "wrote",
            ", ".join(plots(run, os.path.dirname(stem) or ".", os.path.basename(stem) + "-")) or "nothing",
        )
        return 0
    if args.compare:
        text, regressions = compare(*args.compare)
        print(text)
        return 1 if regressions else 0
    cases = preset(args.preset or "quick", args.device)
    if args.ops:
        cases = [c for c in cases if c.op in args.ops]
    if args.impl:
        cases = [c for c in cases if c.anchor or args.impl in c.impl]
    max_seconds = None if args.max_minutes is None else 60 * args.max_minutes
    run = run_cases(cases, args.device, reps=args.reps, graph=args.graph, max_seconds=max_seconds)
    print(table(run))
    out = args.out or os.path.join("bench", "results", _slug(run["environment"]["device"]))
    name = f"{args.preset or 'quick'}{'-graph' if args.graph else ''}{''.join('-' + op for op in args.ops or ())}"
    write_json(run, os.path.join(out, f"{name}.json"))
    written = [] if args.no_plots else plots(run, out, name + "-")
    print(f"\nwrote {os.path.join(out, name + '.json')}" + "".join(f", {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
