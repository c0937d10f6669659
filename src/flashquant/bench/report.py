"""Run cases, derive figures, print the table, write JSON and plots, compare runs."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback

import torch

from .cases import Case
from .harness import DEFAULT_REPS, Timing, environment, time_cpu_interleaved, time_fn


def _progress(items, unit):
    try:
        from tqdm import tqdm

        return tqdm(items, desc="bench", unit=unit, file=sys.stderr)
    except ImportError:
        return items


def _groups(cases: list[Case]) -> list[list[int]]:
    """Indices of `cases`, in runs of consecutive cases with the same group (the presets keep a group's cases,
    anchors included, together)."""
    return [[i for i, _ in run] for _, run in itertools.groupby(enumerate(cases), key=lambda ic: ic[1].group)]


def _unavailable(e: Exception) -> str:
    if os.environ.get("FLASHQUANT_BENCH_DEBUG"):
        traceback.print_exception(e)
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def run_cases(
    cases: list[Case],
    device: str,
    reps: int | None = None,
    graph: bool = False,
    max_seconds: float | None = None,
) -> dict:
    """Time every case (its anchors in the same run). On the CPU a group's cases are timed in turn (shuffled), one
    repetition each per round (harness.time_cpu_interleaved), so the host's drift falls on all of them alike; on
    CUDA each case is timed on its own (CUDA events time the device alone, and one case's rotated inputs at a
    time keep device memory free). Past `max_seconds`, or after Ctrl-C / SIGINT (what `timeout -s INT` sends),
    the remaining cases are recorded as not run (on the CPU, the whole group that was being timed), so a cut-short
    run still returns everything it measured. A case that raises is recorded with its error, never dropped."""
    env = environment(device)
    peak_bw = env.get("peak_bandwidth_gbs") or env["measured_bandwidth_gbs"]
    peak_tf = env.get("peak_bf16_tflops")
    start = time.monotonic()
    stopped = None  # why the remaining cases are not run
    results = [
        {
            "op": c.op,
            "group": c.group,
            "impl": c.impl,
            "anchor": c.anchor,
            "shape": c.shape,
            "dtype": c.dtype,
            "bytes": c.bytes,
            "flops": c.flops,
        }
        for c in cases
    ]

    def record(i: int, t: Timing, rotated: int) -> None:
        r, med = results[i], t.median_ms
        r.update(
            times_ms=[round(x, 5) for x in t.times_ms],
            median_ms=med,
            p10_ms=t.spread_ms[0],
            p90_ms=t.spread_ms[1],
            rotated_inputs=rotated,
            gbs=cases[i].bytes / (med * 1e-3) / 1e9,
            tflops=cases[i].flops / (med * 1e-3) / 1e12,
        )
        r["pct_peak_bw"] = 100 * r["gbs"] / peak_bw
        if peak_tf:
            r["pct_peak_tflops"] = 100 * r["tflops"] / peak_tf

    for members in _progress(_groups(cases), "group"):
        if stopped is None and max_seconds is not None and time.monotonic() - start > max_seconds:
            stopped = f"not run: the time budget ({max_seconds:.0f} s) was spent"
        todo = []
        for i in members:
            if stopped or cases[i].unavailable:
                results[i]["unavailable"] = stopped or cases[i].unavailable
            else:
                todo.append(i)
        try:
            if device == "cuda":
                for i in todo:
                    try:
                        fn, inputs = cases[i].make()
                        record(i, time_fn(device, fn, inputs, reps=reps, graph=graph), len(inputs))
                    except Exception as e:  # an anchor that fails here is reported, never silently dropped
                        results[i]["unavailable"] = _unavailable(e)
                    fn = inputs = None
                    torch.cuda.empty_cache()
            else:
                made = {}
                for i in todo:
                    try:
                        made[i] = cases[i].make()
                    except Exception as e:
                        results[i]["unavailable"] = _unavailable(e)
                timings = time_cpu_interleaved(list(made.values()), reps=reps or DEFAULT_REPS["cpu"])
                for (i, (_, inputs)), t in zip(made.items(), timings):
                    if isinstance(t, Exception):
                        results[i]["unavailable"] = _unavailable(t)
                    else:
                        record(i, t, len(inputs))
                made = timings = None
        except KeyboardInterrupt:
            stopped = "not run: interrupted"
            for i in todo:
                if "median_ms" not in results[i] and "unavailable" not in results[i]:
                    results[i]["unavailable"] = stopped
    _speedups(results)
    run = {"environment": env, "bandwidth_bound_gbs": peak_bw, "graph": graph, "results": results}
    if stopped:
        run["stopped_early"] = stopped
    return run


def _speedups(results):
    groups = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    for rs in groups.values():
        anchors = [a for a in rs if a["anchor"] and "median_ms" in a]
        for r in rs:
            if r["anchor"] or "median_ms" not in r or not anchors:
                continue
            r["speedup_vs"] = {a["impl"]: a["median_ms"] / r["median_ms"] for a in anchors}
            best = min(anchors, key=lambda a: a["median_ms"])
            r["speedup_vs_best_anchor"] = best["median_ms"] / r["median_ms"]
            r["best_anchor"] = best["impl"]
            r["speedup_vs_first_anchor"] = anchors[0]["median_ms"] / r["median_ms"]
            r["first_anchor"] = anchors[0]["impl"]


def table(run: dict) -> str:
    lines = []
    env = run["environment"]
    lines.append(
        f"device: {env['device']} | torch {env['torch']} | triton {env.get('triton')} | "
        f"commit {env.get('git_commit')} | measured bandwidth {env['measured_bandwidth_gbs']} GB/s"
        f"{' | peak ' + str(env['peak_bandwidth_gbs']) + ' GB/s' if 'peak_bandwidth_gbs' in env else ''}"
    )
    hdr = f"{'impl':44s} {'median ms':>10s} {'p10-p90':>15s} {'GB/s':>8s} {'%bw':>5s} {'TFLOP/s':>8s}  vs anchors"
    group = None
    for r in run["results"]:
        if r.get("unavailable", "").startswith("not run"):  # counted once below
            continue
        if r["group"] != group:
            group = r["group"]
            lines += ["", f"== {group} ({r['dtype']})", hdr]
        if "median_ms" not in r:
            lines.append(f"{r['impl']:44s} unavailable: {r['unavailable']}")
            continue
        vs = ""
        if "speedup_vs_first_anchor" in r:
            vs = (
                f"{r['speedup_vs_first_anchor']:.2f}x {r['first_anchor']}; "
                f"{r['speedup_vs_best_anchor']:.2f}x best ({r['best_anchor']})"
            )
        lines.append(
            f"{r['impl']:44s} {r['median_ms']:10.4f} {r['p10_ms']:7.4f}-{r['p90_ms']:<7.4f} "
            f"{r['gbs']:8.1f} {r['pct_peak_bw']:5.1f} {r['tflops']:8.3f}  {vs}"
        )
    if "stopped_early" in run:
        not_run = sum(r.get("unavailable") == run["stopped_early"] for r in run["results"])
        lines += ["", f"stopped early: {not_run} of {len(run['results'])} cases {run['stopped_early']}"]
    return "\n".join(lines)


def write_json(run: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(run, f, indent=1)


def _lines(ax, rows, key, x, y, label):
    """One line per distinct key(r) of `rows`: the points (x(r), r[y]), in x order."""
    for k in sorted({key(r) for r in rows}):
        ax.plot(*zip(*sorted((x(r), r[y]) for r in rows if key(r) == k)), marker="o", label=label(k))


def plots(run: dict, out_dir: str, prefix: str = "") -> list[str]:
    """PNG plots: speedup vs M for matmuls, TFLOP/s vs seqlen for prefill, GB/s vs cache length for decode; file
    names start with `prefix` (the run's name, so that runs of other presets in one directory keep theirs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    res = [r for r in run["results"] if "median_ms" in r]
    dev = run["environment"]["device"]

    def save(fig, name):
        path = os.path.join(out_dir, prefix + name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    qmm = [r for r in res if r["op"] == "quant_matmul" and not r["anchor"]]
    if qmm:
        shapes = sorted({(r["shape"]["N"], r["shape"]["K"]) for r in qmm})
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, (n, k) in zip(axes[0], shapes):
            for impl in sorted({r["impl"] for r in qmm}):
                pts = sorted(
                    (r["shape"]["M"], r["speedup_vs_first_anchor"])
                    for r in qmm
                    if r["impl"] == impl
                    and (r["shape"]["N"], r["shape"]["K"]) == (n, k)
                    and "speedup_vs_first_anchor" in r
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set(
                title=f"N={n} K={k}",
                xlabel="M (tokens)",
                ylabel=f"speedup vs {qmm[0].get('first_anchor', '')}",
            )
            ax.legend(fontsize=7)
        fig.suptitle(f"quantized matmul, {dev}")
        save(fig, "quant_matmul_speedup.png")
    pre = [r for r in res if r["op"] == "prefill"]
    if pre:
        fig, ax = plt.subplots(figsize=(7, 4))
        _lines(
            ax,
            pre,
            key=lambda r: (r["impl"], r["shape"]["D"], r["shape"]["causal"]),
            x=lambda r: r["shape"]["S"],
            y="tflops",
            label=lambda k: f"{k[0]} D={k[1]}{' causal' if k[2] else ''}",
        )
        ax.set_xscale("log", base=2)
        ax.set(xlabel="sequence length", ylabel="TFLOP/s", title=f"prefill, {dev}")
        ax.legend(fontsize=6)
        save(fig, "prefill_tflops.png")
    dec = [r for r in res if r["op"] == "decode"]
    if dec:  # one panel per dtype: a line joins one implementation's cases of one dtype
        dtypes = sorted({r["dtype"] for r in dec})
        fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes):
            _lines(
                ax,
                [r for r in dec if r["dtype"] == dtype],
                key=lambda r: (r["impl"], r["shape"]["B"], r["shape"]["paged"], r["shape"].get("Sq", 1)),
                x=lambda r: r["shape"]["cache"],
                y="gbs",
                label=lambda k: (
                    f"{k[0]} B={k[1]}{' paged' if k[2] else ''}{f' Sq={k[3]}' if k[3] != 1 else ''}"
                ),
            )
            ax.axhline(run["bandwidth_bound_gbs"], color="gray", ls="--", lw=0.8, label="bandwidth bound")
            ax.set_xscale("log", base=2)
            ax.set(xlabel="cache length", ylabel="GB/s (K+V bytes / time)", title=f"decode {dtype}, {dev}")
            ax.legend(fontsize=6)
        save(fig, "decode_gbs.png")
    return written


def compare(old_path: str, new_path: str, threshold: float = 0.05) -> tuple[str, int]:
    """Lines for cases present in both runs; counts regressions slower by more than `threshold`."""
    with open(old_path) as f:
        old = {(r["group"], r["impl"]): r for r in json.load(f)["results"] if "median_ms" in r}
    with open(new_path) as f:
        new = [r for r in json.load(f)["results"] if "median_ms" in r]
    lines, regressions = [], 0
    for r in new:
        o = old.get((r["group"], r["impl"]))
        if not o:
            continue
        ratio = r["median_ms"] / o["median_ms"]
        flag = ""
        if ratio > 1 + threshold:
            flag, regressions = "REGRESSION", regressions + 1
        elif ratio < 1 - threshold:
            flag = "faster"
        lines.append(
            f"{r['group']:45s} {r['impl']:40s} {o['median_ms']:9.4f} -> {r['median_ms']:9.4f} ms "
            f"({ratio:5.2f}x) {flag}"
        )
    return "\n".join(lines) + f"\n{regressions} regression(s) over {threshold:.0%}", regressions


def markdown(run: dict, group_filter: str | None = None) -> str:
    """A markdown summary table (for README.md), generated from a run's JSON; `group_filter` keeps the groups
    whose name contains it (e.g. "M=1 ")."""
    env = run["environment"]
    lines = [
        f"Device: {env['device']}, torch {env['torch']}, {env['threads']} threads, commit {env.get('git_commit')}, "
        f"measured read bandwidth {env['measured_bandwidth_gbs']} GB/s.",
        "",
        "| case | implementation | median ms | GB/s | vs first anchor | vs best anchor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in run["results"]:
        if group_filter and group_filter not in r["group"] + " ":
            continue
        if "median_ms" not in r:
            lines.append(f"| {r['group']} | {r['impl']} | unavailable: {r['unavailable']} | | | |")
            continue
        vs1 = f"{r['speedup_vs_first_anchor']:.2f}x" if "speedup_vs_first_anchor" in r else "(anchor)"
        vsb = f"{r['speedup_vs_best_anchor']:.2f}x" if "speedup_vs_best_anchor" in r else ""
        name = f"**{r['impl']}**" if not r["anchor"] else r["impl"]
        lines.append(f"| {r['group']} | {name} | {r['median_ms']:.3f} | {r['gbs']:.1f} | {vs1} | {vsb} |")
    return "\n".join(lines)
