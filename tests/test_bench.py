"""Keeps the benchmark suite from rotting: import every bench module, run one tiny case of each family on the
CPU through the real harness, and check the report/compare plumbing. (Speed is never asserted.)"""

import importlib.util
import itertools
import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import flashquant as fq
from flashquant import _dispatch
from flashquant.bench import compare, markdown, preset, run_cases, table, write_json

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_modules_import():
    for path in sorted((ROOT / "bench").glob("*.py")):
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        finally:
            sys.path.remove(str(ROOT / "bench"))


def test_smoke_preset_runs_every_family_and_reports_unavailable_anchors(tmp_path):
    cases = preset("smoke", "cpu")
    assert {c.op for c in cases} == {"quant_matmul", "prefill", "decode", "varlen"}
    run = run_cases(cases, "cpu", reps=2)
    res = run["results"]
    assert len(res) == len(cases)  # nothing dropped
    ran = [r for r in res if "median_ms" in r]
    assert any(r["impl"].startswith("flashquant cpu") for r in ran)
    for r in ran:
        assert len(r["times_ms"]) == 2 and r["gbs"] > 0
    for r in res:
        assert "median_ms" in r or r["unavailable"]
    env = run["environment"]
    for key in ("device", "torch", "git_commit", "measured_bandwidth_gbs"):
        assert key in env
    fq_rows = [r for r in ran if not r["anchor"]]
    assert all("speedup_vs_first_anchor" in r for r in fq_rows)
    # the attention families really run here too: Triton under the interpreter (conftest sets TRITON_INTERPRET=1
    # where there is no GPU; on a GPU machine Triton does not take these CPU tensors and says so) and the SDPA
    # anchors on the CPU; CUDA-only entries say why they did not run
    for op in ("prefill", "decode", "varlen"):
        triton_rows = [r for r in res if r["op"] == op and r["impl"] == "flashquant triton"]
        assert triton_rows and all(("median_ms" in r) == _dispatch.triton_interpret() for r in triton_rows)
    assert any(
        r["impl"] == "flashquant auto" and "prefill_chunk" in r["shape"] and "median_ms" in r for r in res
    )
    assert any(r["op"] == "decode" and r["anchor"] and "median_ms" in r for r in res)
    text = table(run)
    assert "unavailable: " in text
    write_json(run, str(tmp_path / "a.json"))
    write_json(run, str(tmp_path / "b.json"))
    report, regressions = compare(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert regressions == 0 and "flashquant cpu" in report
    md = markdown(run)
    assert md.count("\n|") >= len(cases) and "unavailable" in md


def test_compare_flags_a_regression(tmp_path):
    base = {"results": [{"group": "g", "impl": "x", "median_ms": 1.0}]}
    slow = {"results": [{"group": "g", "impl": "x", "median_ms": 1.5}]}
    (tmp_path / "old.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(slow))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashquant.bench",
            "--compare",
            str(tmp_path / "old.json"),
            str(tmp_path / "new.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "REGRESSION" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_pytest_benchmark_cases_skip_cleanly_without_a_gpu():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            str(ROOT / "bench" / "test_bench_attention.py"),
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipped" in out.stdout


def test_gpu_crossover_preset_measures_both_auto_boundaries():
    """On a GPU the crossover preset times quant_matmul's CUDA/Triton/auto over M (the M <= 16 rule) and the CUDA
    vs Triton decode kernels at 4 and 8 query heads per KV head (auto's order for attention_with_kvcache).
    Building the case list allocates nothing, so this runs on the CPU."""
    from flashquant.bench.cases import dispatch_crossover_cases

    cases = dispatch_crossover_cases("cuda")
    decode = {(c.group, c.impl) for c in cases if c.op == "decode"}
    for group in ("decode B=1 cache=8192 contiguous", "decode B=1 cache=8192 contiguous Hq/Hkv=64/8"):
        assert {(group, "flashquant cuda"), (group, "flashquant triton")} <= decode
    qmm_impls = {c.impl for c in cases if c.op == "quant_matmul"}
    assert any("cuda" in i for i in qmm_impls) and any("triton" in i for i in qmm_impls)
    # The Triton launcher's fused and dequantize-then-cuBLAS strategies, both forced, on both sides of its switch.
    from flashquant.kernels.quant_matmul import DEQUANT_GEMM_MIN_M

    forced = {(c.shape["M"], *c.impl.split()[1:3]) for c in cases if "triton-" in c.impl}
    for bits, switch in DEQUANT_GEMM_MIN_M.items():
        for m in (switch // 2, switch, 2048):
            assert {(m, "triton-fused", f"int{bits}"), (m, "triton-dequant", f"int{bits}")} <= forced


def test_cpu_crossover_preset_times_both_cpu_strategies_around_each_switch():
    """On a CPU the crossover preset times the cpu backend's fused kernel and its dequantize + BLAS strategies, all
    forced, at every M and in every activation dtype, next to auto and F.linear on unquantized weights. Building
    the case list allocates nothing."""
    from flashquant.bench.cases import dispatch_crossover_cases

    cases = [c for c in dispatch_crossover_cases("cpu") if c.op == "quant_matmul"]
    forced = {(c.shape["M"], c.dtype, *c.impl.split()[1:3]) for c in cases if "cpu-" in c.impl}
    for m in (16, 128, 512, 1024):
        for dt in ("float32", "bfloat16", "float16"):
            for bits in (4, 8):
                assert {(m, dt, "cpu-fused", f"int{bits}"), (m, dt, "cpu-dequant", f"int{bits}")} <= forced
                # half precision through the fp32 GEMM (what CPUs without AMX run) only for half precision
                assert ((m, dt, "cpu-dequant_fp32", f"int{bits}") in forced) == (dt != "float32")
    assert any(c.impl.startswith("flashquant auto") for c in cases)
    assert any(c.impl.startswith("torch F.linear") for c in cases)


@pytest.mark.skipif(not fq.backends()["cpu"].available, reason="C++ extension not built")
def test_cpu_forced_strategy_cases_run_and_agree():
    """The forced-strategy cases call the CPU launcher (not quant_matmul's dispatch) and compute the same matmul."""
    from flashquant.bench.cases import _qmm_flashquant

    outs = []
    for strategy in ("fused", "dequant"):
        torch.manual_seed(0)  # the same weights and activations for both
        fn, inputs = _qmm_flashquant("cpu", 24, 256, 5, 4, 128, "cpu", torch.float32, strategy).make()
        outs.append(fn(*inputs[0]))
    assert outs[0].shape == (5, 24)
    assert torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3)


def test_a_run_cut_short_keeps_what_it_measured_and_says_what_it_did_not():
    """A lent GPU's calls have hard time limits: past max_seconds, or on SIGINT (KeyboardInterrupt, what
    `timeout -s INT` sends), run_cases stops starting cases and records the rest as not run, so the JSON of
    what was measured is still written. On the CPU a group is timed as a whole, so the group that was being set
    up when the interrupt came is not run either."""
    from flashquant.bench import Case

    made = []

    def case(name, group, interrupt=False):
        def make():
            made.append(name)
            if interrupt:
                raise KeyboardInterrupt
            return (lambda: None), [()]

        return Case("decode", group, name, name == "anchor", {}, "float16", 1, 1, make)

    cases = [case("anchor", "g1"), case("ours", "g1"), case("made", "g2"), case("cut", "g2", True)]
    cases.append(case("after", "g3"))
    run = run_cases(cases, "cpu", reps=2)
    assert made == ["anchor", "ours", "made", "cut"]  # nothing started after the interrupt
    assert [("median_ms" in r) for r in run["results"]] == [True, True, False, False, False]
    assert run["stopped_early"] == "not run: interrupted"
    assert [r.get("unavailable") for r in run["results"][2:]] == ["not run: interrupted"] * 3
    assert "stopped early: 3 of 5 cases not run: interrupted" in table(run)

    made.clear()
    run = run_cases(cases[:2], "cpu", reps=2, max_seconds=0)
    assert made == [] and run["stopped_early"].startswith("not run: the time budget")
    assert all(r["unavailable"] == run["stopped_early"] for r in run["results"])


def test_cpu_cases_of_a_group_are_timed_in_turn_and_a_failing_one_is_reported():
    """The host drifts by 15-30% over seconds: each round times one repetition of every case of the group, in an
    order shuffled per round (a call also pays for the one before it: no case always follows the same one), so no
    case carries a slow stretch alone. A case that raises in a repetition is recorded with its error; the others
    keep all their repetitions."""
    from flashquant.bench import Case

    calls = []

    def case(name, fail_on_call=None):
        def make():
            n = [0]

            def fn():
                n[0] += 1
                calls.append(name)
                if n[0] == fail_on_call:
                    raise RuntimeError(f"{name} broke")

            return fn, [()]

        return Case("decode", "g", name, name == "a", {}, "float16", 1, 1, make)

    run = run_cases([case("a"), case("b"), case("c")], "cpu", reps=8)
    assert calls[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # warm-up, one case after the other
    rounds = [tuple(calls[i : i + 3]) for i in range(9, len(calls), 3)]
    assert len(rounds) == 8 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len(set(rounds)) > 1  # shuffled, not one fixed order
    assert all(len(r["times_ms"]) == 8 for r in run["results"])

    calls.clear()
    run = run_cases([case("a"), case("b"), case("c", fail_on_call=5)], "cpu", reps=3)  # c's 2nd timed call
    assert sorted(calls[9:12]) == sorted(calls[12:15]) == ["a", "b", "c"] and sorted(calls[15:]) == ["a", "b"]
    a, b, c = run["results"]
    assert len(a["times_ms"]) == len(b["times_ms"]) == 3
    assert "median_ms" not in c and c["unavailable"] == "RuntimeError: c broke"
    assert "speedup_vs" in b and "speedup_vs" not in a


@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_sdpa_anchor_computes_what_the_kernel_computes(paged, sq):
    """The anchor's speed is only a comparison if it does the same work: on each rotated input, SDPA (on the paged
    cache, after gathering the blocks into its kept buffers; with the kernel's bottom-right causal mask for several
    new tokens) gives flashquant's output."""
    from flashquant.bench.cases import decode_cases

    torch.manual_seed(0)
    cases = decode_cases("cpu", [2], [128], (paged,), hq=4, hkv=2, d=32, dtype=torch.float32, page=16, sq=sq)
    (anchor,) = [c for c in cases if c.anchor]
    fn, inputs = anchor.make()
    for q, kc, vc, lens, block_table in inputs[:3]:  # the second and third reuse the gather buffers
        want = fq.attention_with_kvcache(q, kc, vc, lens, block_table=block_table, backend="reference")
        got = fn(q, kc, vc, lens, block_table).transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefill_chunk", [0, 24])
def test_varlen_sdpa_anchor_computes_what_the_kernel_computes(prefill_chunk):
    """The continuous-batching anchor (SDPA once per sequence) gives attention_varlen's output on each rotated
    input: one new token per sequence against its own ragged stretch of the packed cache, and with a prompt chunk
    first, that chunk causal over its own keys; flashquant's cases (auto too, for the chunked batch) compute it."""
    from flashquant.bench.cases import varlen_decode_cases

    torch.manual_seed(0)
    cases = varlen_decode_cases(
        "cpu", [3], [64], hq=4, hkv=2, d=32, dtype=torch.float32, prefill_chunk=prefill_chunk
    )
    (anchor,) = [c for c in cases if c.anchor]
    assert anchor.shape["cache_total"] == prefill_chunk + 16 + 40 + 64
    impls = {c.impl: c for c in cases if not c.anchor}
    assert sorted(impls) == ["flashquant auto", "flashquant cpu", "flashquant triton"][(not prefill_chunk) :]
    fn, inputs = anchor.make()
    for q, k, v, cu_q, cu_k, max_q, max_k in inputs[:2]:
        assert q.shape[0] == prefill_chunk + 3 and max_q == max(prefill_chunk, 1)
        want = fq.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, backend="reference")
        got = torch.cat([o[0].transpose(0, 1) for o in fn(q, k, v, cu_q, cu_k, max_q, max_k)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for name in ("flashquant cpu", "flashquant auto")[: len(impls) - 1]:
            kernel_fn, _ = impls[name].make()
            torch.testing.assert_close(
                kernel_fn(q, k, v, cu_q, cu_k, max_q, max_k), want, rtol=1e-5, atol=1e-5
            )


def test_plots_draw_every_family_and_one_decode_panel_per_dtype(tmp_path):
    """The PNGs a run writes: a decode run with two dtypes gets one panel per dtype (a line never joins a bf16
    point to an fp32 one)."""
    pytest.importorskip("matplotlib")
    from flashquant.bench.report import plots

    def row(op, impl, shape, dtype, **fig):
        return {
            "op": op,
            "impl": impl,
            "anchor": False,
            "shape": shape,
            "dtype": dtype,
            "median_ms": 1.0,
            **fig,
        }

    results = [
        row("decode", "flashquant cpu", {"B": 1, "cache": s, "paged": False}, dt, gbs=float(s % 7))
        for s in (1024, 2048)
        for dt in ("bfloat16", "float32")
    ]
    results += [row("prefill", "flashquant triton", {"S": s, "D": 128, "causal": True}, "bfloat16", tflops=1.0)
                for s in (512, 1024)]  # fmt: skip
    run = {"environment": {"device": "test"}, "bandwidth_bound_gbs": 10.0, "results": results}
    written = plots(run, str(tmp_path), "run-")
    names = ("run-decode_gbs.png", "run-prefill_tflops.png")
    assert sorted(pathlib.Path(p).name for p in written) == list(names)
    from PIL import Image  # matplotlib's own dependency

    width = {n: Image.open(tmp_path / n).size[0] for n in names}
    assert width[names[0]] == 2 * width[names[1]]  # two 7-inch panels against one
    # `--plots RUN.json` draws a recorded run's plots next to it, named after it
    import json

    from flashquant.bench.__main__ import main

    (tmp_path / "old.json").write_text(json.dumps(run))
    assert main(["--plots", str(tmp_path / "old.json")]) == 0
    assert (tmp_path / "old-decode_gbs.png").exists() and (tmp_path / "old-prefill_tflops.png").exists()


def test_llama_presets_interleave_the_op_families_group_by_group():
    """So that a run cut short by its time budget has measured some of every family, not only quant_matmul;
    each group stays contiguous (its anchors are timed in the same stretch) and no case is lost."""
    cases = preset("llama3-8b", "cuda")  # building cases allocates nothing
    groups = [g for g, _ in itertools.groupby(cases, key=lambda c: c.group)]
    assert len(groups) == len({c.group for c in cases})  # every group contiguous
    ops = {c.group: c.op for c in cases}
    assert [ops[g] for g in groups[:4]] == ["quant_matmul", "prefill", "decode", "varlen"]
    by_op = {
        op: [(c.group, c.impl) for c in cases if c.op == op]
        for op in ("quant_matmul", "prefill", "decode", "varlen")
    }
    assert len(by_op["quant_matmul"]) == 240 and len(by_op["prefill"]) == 120 and len(by_op["decode"]) == 90
    # (2 batches x 2 cache lengths + 1 chunked-prefill batch) x (Triton, SDPA per sequence)
    assert len(by_op["varlen"]) == 10


def test_gpu_session_script_parses_and_names_existing_test_files():
    """scripts/gpu_session.sh only ever runs on a lent GPU, whose time is scarce: a syntax error or a renamed test
    file would cost a device call."""
    script = ROOT / "scripts" / "gpu_session.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in set(re.findall(r"tests/test_\w+\.py", script.read_text())):
        assert (ROOT / name).is_file(), f"gpu_session.sh names {name}, which does not exist"


def test_source_digest_identifies_the_code_whatever_git_says(tmp_path):
    """A lent GPU's copy of the tree kept a stale .git (every result file of the first H100 session names the
    session's first commit): the digest of the sources is what ties a result to its code."""
    from flashquant.bench.harness import source_digest

    pkg = tmp_path / "src" / "flashquant"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "kernels" / "k.py").write_text("x = 1\n")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "k.cu").write_text("// kernel\n")
    first = source_digest(str(pkg))
    assert first == source_digest(str(pkg))
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "k.cpython.py").write_text("cache")
    (pkg / "notes.txt").write_text("not source")
    assert source_digest(str(pkg)) == first  # caches and non-source files do not count
    (tmp_path / "csrc" / "k.cu").write_text("// kernel, changed\n")
    changed = source_digest(str(pkg))
    assert changed != first
    (pkg / "kernels" / "k.py").rename(pkg / "kernels" / "j.py")
    assert source_digest(str(pkg)) != changed  # a renamed file is a different tree
    env_keys = run_cases([], "cpu", reps=1)["environment"]
    assert re.fullmatch(r"[0-9a-f]{12}", env_keys["source_digest"])


def test_profile_script_runs_every_kernel_it_names(capsys):
    """scripts/profile_kernels.py runs under ncu on a lent GPU; here it runs at --small shapes through the Triton
    interpreter (and refuses full shapes without a GPU), so a broken script never costs a device call."""
    spec = importlib.util.spec_from_file_location("profile_kernels", ROOT / "scripts" / "profile_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not torch.cuda.is_available():
        assert module.main([]) == 2
    assert module.main(["--small"]) == 0
    profiled = re.findall(r"profiled: (.*)", capsys.readouterr().out)
    expected = ["quant_matmul int4 g128", "quant_matmul int8 per-channel", "dequantize int4", "decode B=1"]
    for what in expected:
        assert any(
            p.startswith(what) and (what == "dequantize int4" or p.endswith("triton")) for p in profiled
        )
    for what in [
        "rms_norm + residual",
        "rotary q+k",
        "append_kv",
        "silu_mul",
    ]:  # the decode step's small kernels
        assert any(p.startswith(what) for p in profiled), profiled


def test_accuracy_report_measures_every_format_and_method(tmp_path):
    """python -m flashquant.bench.accuracy on a small shape: a row per distribution x format x method, SQNRs that
    its own recomputation confirms, mse never below minmax on the weights (it cannot be: per group), and gptq (with
    and without act_order) above mse on the outputs (the inputs are correlated, as its calibration)."""
    from flashquant.bench import accuracy

    out = tmp_path / "acc.json"
    assert accuracy.main(["--shape", "32", "256", "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    rows = run["results"]
    per_distribution = len(accuracy.FORMATS) * 2 * len(accuracy.METHODS)  # x symmetric / asymmetric
    assert run["environment"]["device"] and len(rows) == len(accuracy.DISTRIBUTIONS) * per_distribution
    pairs = {}
    for r in rows:
        pairs.setdefault((r["distribution"], r["bits"], r["group_size"], r["symmetric"]), {})[r["method"]] = r
    for m in pairs.values():
        assert m["mse"]["weight_sqnr_db"] >= m["minmax"]["weight_sqnr_db"] - 1e-9
        assert m["gptq"]["output_sqnr_db"] > m["mse"]["output_sqnr_db"]
        assert m["gptq-act"]["output_sqnr_db"] > m["mse"]["output_sqnr_db"]
    g = torch.Generator().manual_seed(0)
    w = accuracy.DISTRIBUTIONS["gaussian"]((32, 256), g).bfloat16().float()
    deq = fq.quantize(w.bfloat16(), 4, 128).dequantize(torch.float32)
    first = next(
        r for r in rows if r["distribution"] == "gaussian" and r["bits"] == 4 and r["group_size"] == 128
    )
    assert first["symmetric"] and first["method"] == "minmax"
    assert abs(first["weight_sqnr_db"] - accuracy.sqnr_db(w, deq)) < 1e-9


def test_checkpoint_report_runs_every_variant_and_counts_the_bytes_each_token_reads(tmp_path):
    """python -m flashquant.bench.checkpoint on the tiny preset: a row per dtype x lm_head variant plus the dense
    anchor, and the bytes per token it reports are the linears' own (recomputed here for the fp16 rows)."""
    from flashquant.bench import checkpoint
    from flashquant.models.llama import LlamaConfig

    out = tmp_path / "ckpt.json"
    args = ["--preset", "tiny", "--layers", "1", "--prompt-len", "4", "--new-tokens", "2", "--reps", "1"]
    assert checkpoint.main([*args, "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    rows = {r["name"]: r for r in run["results"]}
    assert run["environment"]["device"] and list(rows) == [name for name, *_ in checkpoint.variants()]
    cfg = LlamaConfig()  # the tiny preset: hidden 128, intermediate 384, 4/2 heads of 32, vocab 512
    h, i, q, kv, v = cfg.hidden_size, cfg.intermediate_size, 4 * 32, 2 * 32, cfg.vocab_size
    codes = (h * (q + 2 * kv) + q * h + 3 * h * i) // 2  # int4: half a byte per weight
    scales = 2 * (h * (q + 2 * kv) + q * h + 2 * h * i) // 128 + 2 * i * h // 128  # fp16, one per 128 weights
    lm_head = {"keep": 2 * v * h, "int8": v * h + 2 * v, "int4": v * h // 2 + 2 * v * h // 128}
    for name, lm_bytes in lm_head.items():
        assert round(rows[f"fp16 / lm_head {name}"]["read_gb_per_token"] * 1e9) == codes + scales + lm_bytes
    dense = 2 * (h * (q + 2 * kv) + q * h + 3 * h * i + v * h)
    assert round(rows["fp16 dense (dequantized)"]["read_gb_per_token"] * 1e9) == dense
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows.values())
