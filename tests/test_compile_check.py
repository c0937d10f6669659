"""python -m flashquant compile-check: every Triton launch the package makes at Llama-3-8B shapes compiles for
A100 (sm_80), L4/RTX 4090 (sm_89) and H100 (sm_90a) with Triton's compiler and ptxas, no GPU needed, and the
cubin has the properties the kernels were written for. This covers bf16, which the interpreter cannot run."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from flashquant import aot
from flashquant.kernels import configs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it re-execs without it anyway
    proc = subprocess.run(
        [sys.executable, "-m", "flashquant", "compile-check", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def _rows(report, kernel=None):
    return [r for r in report[1]["results"] if kernel is None or r["kernel"] == kernel]


def test_every_default_launch_compiles_and_fits_every_arch(report):
    proc, data = report
    assert proc.returncode == 0 and data["problems"] == [], proc.stdout[-5000:]
    cases = set(aot._cases(torch.float16))
    seen = {
        (r["case"], r["arch"], r["dtype"])
        for r in _rows(report, "_attn_fwd_kernel")
        + _rows(report, "_qmm_kernel")
        + _rows(report, "_dequant_kernel")
        + _rows(report, "_rms_norm_kernel")
        + _rows(report, "_rotary_kernel")
        + _rows(report, "_silu_mul_kernel")
        + _rows(report, "_append_kv_kernel")
    }
    assert seen == {(c, a, d) for c in cases for a in aot.ARCHS for d in ("bfloat16", "float16")}
    for r in data["results"]:
        assert not r["error"], r
        assert 0 <= r["shared"] <= aot.ARCHS[r["arch"]].smem_per_block, r  # elementwise kernels use none
        assert r["regs"] > 0 and r["programs_per_sm"] >= 1, r


def test_matrix_kernels_use_tensor_cores_and_16_byte_copies(report):
    for r in _rows(report, "_attn_fwd_kernel") + _rows(report, "_qmm_kernel"):
        assert r["hmma"] + r["hgmma"] > 0, r
        assert set(r["copy_bytes"]) == {"16"}, r  # JSON keys; every global->shared copy is full width
    # Hopper's warpgroup MMA wherever a program's tile has >= 64 rows (prefill attention, the big-M matmul).
    for r in _rows(report):
        if r["arch"] == 90 and (r["case"].startswith("prefill") or "M=4096" in r["case"]):
            assert r["hgmma"] > 0, r


def test_int4_dequant_does_no_int_to_float_conversion_per_weight(report):
    """The magic-number dequantization (codes ORed into a float's mantissa) replaces one quarter-rate I2F per weight;
    the few left in the loop are index arithmetic. Each thread dequantizes >= 32 weights per loop trip."""
    for r in _rows(report, "_qmm_kernel"):
        if "int4" in r["case"] or r["dtype"] == "float16":
            assert r["loop_i2f"] <= 4, r
        else:  # bf16 cannot hold 128 + an 8-bit code exactly: int8 bf16 converts each weight
            assert r["loop_i2f"] >= 32, r


def test_small_shared_memory_devices_get_defaults_that_fit(report):
    small = configs.defaults(99 * 1024)
    assert small["attention.prefill.d128"] != configs.DEFAULTS["attention.prefill.d128"]
    assert configs.defaults(227 * 1024) == configs.DEFAULTS == configs.defaults(None)
    big = [
        r
        for r in _rows(report, "_attn_fwd_kernel")
        if r["case"].startswith("prefill causal") and r["arch"] == 80
    ]
    assert (
        max(r["shared"] for r in big) > aot.ARCHS[89].smem_per_block
    )  # the sm_89 defaults really are needed


def test_table_merges_tuned_entries_over_the_small_smem_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHQUANT_CONFIG_DIR", str(tmp_path / "env"))
    configs.clear_cache()
    try:
        (tmp_path / "env").mkdir()
        (tmp_path / "env" / "Small_GPU.json").write_text(
            json.dumps({"configs": {"attention.decode.d64": [32, 2, 1]}})
        )
        merged = configs.table("Small_GPU", 99 * 1024)
        assert merged["attention.prefill.d128"] == configs.SMALL_SMEM_DEFAULTS["attention.prefill.d128"]
        assert merged["attention.decode.d64"] == (32, 2, 1)
        assert (
            configs.table("Small_GPU")["attention.prefill.d128"] == configs.DEFAULTS["attention.prefill.d128"]
        )
    finally:
        configs.clear_cache()


def test_problems_flags_each_failed_check():
    ok = aot.Result("c", "_qmm_kernel", 90, "bfloat16", "cfg", 1, regs=64, shared=1024, hmma=4,
                    copy_bytes={16: 2}, loop_instructions=100)  # fmt: skip
    assert aot.problems([ok]) == []
    bad = [
        aot.Result("c", "_qmm_kernel", 90, "bfloat16", "cfg", 1, error="CompilationError: x"),
        aot.Result("c", "_qmm_kernel", 89, "bfloat16", "cfg", 1, regs=64, shared=120 * 1024, hmma=4,
                   copy_bytes={16: 2}, loop_instructions=100),
        aot.Result("c", "_qmm_kernel", 90, "bfloat16", "cfg", 1, regs=255, shared=1024, hmma=4,
                   copy_bytes={16: 2}, loop_instructions=100, loop_spills=5),
        aot.Result("c", "_attn_fwd_kernel", 90, "float16", "cfg", 1, regs=64, shared=1024, copy_bytes={16: 2}),
        aot.Result("c", "_qmm_kernel", 90, "float16", "cfg", 1, regs=64, shared=1024, hmma=4,
                   copy_bytes={8: 2, 16: 1}),
    ]  # fmt: skip
    found = aot.problems(bad)
    assert len(found) == 5
    for text, expect in zip(found, ("does not compile", "shared memory", "spill", "tensor-core", "narrower")):
        assert expect in text
    assert aot.problems(bad[2:3], defaults=False) == []  # tuning candidates may spill


def test_main_loop_is_the_longest_backward_branch():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   I2F R2, R3 ;
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   STL [R1], R2 ;
        /*0040*/              @P0 BRA 0x20 ;
        /*0050*/                   FADD R2, R2, R3 ;
        /*0060*/                   BRA 0x60 ;
        /*0070*/                   EXIT ;
    """
    assert aot._main_loop(sass) == ["HMMA", "STL", "BRA"]


@pytest.mark.skipif(
    aot.find_nvcc() is None or aot.cuda_source("quant_gemv.cu") is None,
    reason="needs nvcc and a source checkout",
)
def test_cuda_gemv_is_not_instruction_bound_at_any_m():
    """Every instantiation of the CUDA GEMV (fp16/bf16 x int4/int8 x one or two n8 tiles x sym/asym) uses tensor
    cores, does not spill, and issues few enough instructions per weight that instruction issue allows more
    than H100's HBM bandwidth. The per-lane FFMA kernel it replaced failed this at every M for int4 (79% at
    M = 1, 11% at M = 16)."""
    loops = aot.cuda_gemv_loops(aot.cuda_source("quant_gemv.cu"))
    assert len(loops) == 16, [dataclasses.astuple(r) for r in loops]
    for r in loops:
        assert r.hmma > 0 and r.spill_bytes == 0, r
        assert r.issue_ceiling >= 1.0, r


@pytest.mark.skipif(
    aot.find_nvcc() is None or aot.cuda_source("decode_attention.cu") is None,
    reason="needs nvcc and a source checkout",
)
def test_cuda_decode_kernel_is_not_instruction_bound_at_any_group():
    """Every instantiation of the CUDA flash-decoding kernel (fp16/bf16 x D 64/128/256 x one or two n8 tiles of
    query heads) uses tensor cores, does not spill, and issues few enough instructions per 16-key step that
    instruction issue allows more than H100's HBM bandwidth. The scalar-FMA kernel it replaced did not at G = 8
    (its shared-memory traffic alone capped it at ~58%)."""
    loops = aot.cuda_decode_loops(aot.cuda_source("decode_attention.cu"))
    assert len(loops) == 10, [dataclasses.astuple(r) for r in loops]  # D = 256 has only one head tile
    for r in loops:
        assert r.hmma > 0 and r.spill_bytes == 0, r
        assert r.issue_ceiling >= 1.0, r
