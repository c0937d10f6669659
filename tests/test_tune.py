"""Launch-config tables (kernels/configs.py) and the tuner that writes them (python -m flashquant tune).

The tuner's timings under the interpreter mean nothing; these tests check the mechanics: that it measures
every candidate, rejects wrong or failing ones, keeps the fastest correct one, writes a table, and that the
launchers then really launch with the table's configs."""

import json
import logging
import subprocess
import sys
import time

import pytest
import torch

from flashquant import tune
from flashquant.kernels import configs
from flashquant.reference.attention import attention_ref
from tolerances import assert_close

CPU = torch.device("cpu")


@pytest.fixture
def table_dirs(tmp_path, monkeypatch):
    """Empty user-cache and FLASHQUANT_CONFIG_DIR directories; the loaded tables are forgotten before/after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHQUANT_CONFIG_DIR", str(tmp_path / "env"))
    configs.clear_cache()
    yield configs.user_dir(), tmp_path / "env"
    configs.clear_cache()


def _write(directory, entries):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{configs.INTERPRETER_KEY}.json").write_text(json.dumps({"configs": entries}))


def test_defaults_without_tables(table_dirs):
    for name, cfg in configs.DEFAULTS.items():
        assert configs.lookup(CPU, name) == cfg


def test_env_table_wins_over_user_table_key_by_key(table_dirs):
    user, env = table_dirs
    _write(
        user, {"attention.decode.d64": [32, 2, 1], "quant_matmul.int4.m16": {"config": [16, 32, 64, 2, 2]}}
    )
    _write(env, {"attention.decode.d64": {"config": [128, 8, 3]}})
    assert configs.lookup(CPU, "attention.decode.d64") == (128, 8, 3)
    assert configs.lookup(CPU, "quant_matmul.int4.m16") == (16, 32, 64, 2, 2)
    assert configs.lookup(CPU, "attention.prefill.d64") == configs.DEFAULTS["attention.prefill.d64"]


def test_describe_names_the_table_in_use(table_dirs):
    _, env = table_dirs
    assert "built-in defaults" in configs.describe(CPU)
    _write(env, {"attention.decode.d64": [32, 2, 1]})
    configs.clear_cache()
    text = configs.describe(CPU)
    assert "1 of" in text and str(env) in text


def test_bad_entries_and_files_are_ignored_with_a_warning(table_dirs, caplog):
    user, env = table_dirs
    _write(
        user,
        {
            "attention.decode.d64": [32, 2],
            "no.such.key": [1],
            "attention.decode.d128": [0, 4, 2],
            "attention.decode.d256": {"default": [32, 4, 2], "rejected": {"[32, 4, 2]": "OutOfResources"}},
        },
    )
    env.mkdir(parents=True)
    (env / f"{configs.INTERPRETER_KEY}.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="flashquant"):
        assert configs.lookup(CPU, "attention.decode.d64") == configs.DEFAULTS["attention.decode.d64"]
        assert configs.lookup(CPU, "attention.decode.d128") == configs.DEFAULTS["attention.decode.d128"]
        assert configs.lookup(CPU, "attention.decode.d256") == configs.DEFAULTS["attention.decode.d256"]
    text = caplog.text
    assert "unreadable" in text and "no.such.key" in text and "[32, 2]" in text and "[0, 4, 2]" in text
    assert "d256" not in text  # an untuned key (no "config") is not an error


def test_attention_kernel_launches_with_the_table_config(table_dirs, monkeypatch):
    """A table entry reaches the launch: the kernel is called with its BLOCK_N / num_warps, and stays correct."""
    from flashquant.kernels import attention as tri

    _, env = table_dirs
    _write(env, {"attention.decode.d64": [16, 2, 1], "attention.prefill.d64": [32, 16, 2, 1]})
    seen = []
    kernel = tri._attn_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))
                return kernel[grid](*args, **kw)

            return launch

    monkeypatch.setattr(tri, "_attn_fwd_kernel", Spy())
    q, k, v = torch.randn(1, 40, 4, 64), torch.randn(1, 40, 2, 64), torch.randn(1, 40, 2, 64)
    out, _ = tri.attention_dense(q, k, v, True, 0.125, (-1, -1), 0.0, False)  # 80 rows: prefill
    assert_close(out, attention_ref(q, k, v, True, 0.125)[0], torch.float32, "prefill with table config")
    out, _ = tri.attention_dense(q[:, :3], k, v, True, 0.125, (-1, -1), 0.0, False)  # 6 rows: decode
    assert_close(
        out, attention_ref(q[:, :3], k, v, True, 0.125)[0], torch.float32, "decode with table config"
    )
    assert seen == [(32, 16, 2, 1), (16, 16, 2, 1)]


def _synthetic_task(behaviour):
    """A Task whose candidates behave as told ('ok', 'slow', 'wrong', 'raise'), no kernel involved."""
    ref = torch.linspace(-1, 1, 64)
    cands = [(i,) for i in range(len(behaviour))]

    def run(cfg):
        what = behaviour[cfg[0]]
        if what == "raise":
            raise RuntimeError("out of resource: shared memory")
        return [ref + 0.5 if what == "wrong" else ref.clone()]

    def timed(cfg):
        delay = 0.02 if behaviour[cfg[0]] == "slow" else 0.0
        return [(lambda: time.sleep(delay), [()])]

    return tune.Task("synthetic", "64", cands, run, [ref], timed)


def test_tuner_keeps_fastest_correct_candidate_and_rejects_the_rest():
    entry = tune.tune_task(_synthetic_task(["slow", "wrong", "raise", "ok"]), CPU, torch.float32, quick=True)
    assert entry["config"] == [3]
    assert entry["default"] == [0] and entry["speedup_vs_default"] > 1
    assert set(entry["rejected"]) == {"[1]", "[2]"}
    assert "error" in entry["rejected"]["[1]"] and "RuntimeError" in entry["rejected"]["[2]"]
    assert entry["tried"] == 4


def test_tuner_keeps_the_default_when_it_is_fastest():
    entry = tune.tune_task(_synthetic_task(["ok", "slow", "wrong"]), CPU, torch.float32, quick=True)
    assert entry["config"] == [0] and entry["speedup_vs_default"] == 1.0


def test_tune_quick_run_writes_a_table_the_launchers_load(table_dirs):
    """End to end under the interpreter: tune two keys, the table lists them, lookup serves them."""
    _, env = table_dirs
    keys = ["attention.decode.d64", "quant_matmul.int4.m16", "quant_matmul.int8.m16"]
    assert tune.main(["--quick", "--out", str(env), "--keys", *keys]) == 0
    table = json.loads((env / f"{configs.INTERPRETER_KEY}.json").read_text())
    assert sorted(table["configs"]) == keys
    assert table["quick"] is True and table["dtype"] == "float16" and table["triton"]
    for key in keys:
        entry = table["configs"][key]
        assert entry["tried"] == 2 and "rejected" not in entry, entry
        assert configs.lookup(CPU, key) == tuple(entry["config"])
    # a second run on another key merges into the same file
    assert tune.main(["--quick", "--out", str(env), "--keys", "attention.decode.d128"]) == 0
    table = json.loads((env / f"{configs.INTERPRETER_KEY}.json").read_text())
    assert sorted(table["configs"]) == sorted([*keys, "attention.decode.d128"])


def test_tune_stopped_from_outside_keeps_the_keys_it_finished(table_dirs, monkeypatch):
    """On a lent GPU the tune stage runs under `timeout -s INT`: a key interrupted there must not lose the keys
    tuned before it (the table is written after every key)."""
    _, env = table_dirs
    real, calls = tune.tune_task, []

    def interrupt_second(task, *args, **kwargs):
        calls.append(task.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task, *args, **kwargs)

    monkeypatch.setattr(tune, "tune_task", interrupt_second)
    keys = ["quant_matmul.int4.m16", "quant_matmul.int8.m16"]
    assert tune.main(["--quick", "--out", str(env), "--keys", *keys]) == 130
    table = json.loads((env / f"{configs.INTERPRETER_KEY}.json").read_text())
    assert sorted(table["configs"]) == [calls[0]] and table["triton"]


def test_tune_cli_errors(tmp_path):
    assert tune.main(["--out", str(tmp_path), "--keys", "attention.nope*"]) == 2
    if not torch.cuda.is_available():  # without a GPU, writing a table for real use needs an explicit --out
        r = subprocess.run([sys.executable, "-m", "flashquant", "tune"], capture_output=True, text=True)
        assert r.returncode == 2 and "--out" in r.stdout


def test_quant_matmul_tuning_times_the_fused_kernel_its_configs_belong_to(monkeypatch):
    """From DEQUANT_GEMM_MIN_M the launcher dequantizes and calls cuBLAS, which takes no launch config: tune must
    force the fused kernel, or every candidate would time the same thing and the 'winner' would be noise."""
    from flashquant import tune
    from flashquant.kernels import quant_matmul as qmm_module

    seen = []
    real = qmm_module.quant_matmul_triton

    def spy(x, *args, **kwargs):
        seen.append((x.shape[0], kwargs.get("strategy")))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(qmm_module, "quant_matmul_triton", spy)
    dtype = torch.float16
    tasks = list(tune._quant_matmul_tasks(torch.device("cpu"), dtype, True, lambda key: key.endswith("mbig")))
    assert [t.key for t in tasks] == ["quant_matmul.int4.mbig", "quant_matmul.int8.mbig"]
    for task in tasks:
        task.run(task.candidates[0])
    assert seen and all(strategy == "fused" for _, strategy in seen)
