import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import flashquant as fq
from flashquant import _dispatch


def test_backends_reports_every_backend_with_a_reason():
    info = fq.backends()
    assert set(info) == set(_dispatch.BACKENDS)
    assert info["reference"].available and info["torch"].available
    for b in info.values():
        assert b.reason
    if not torch.cuda.is_available():
        assert not info["cuda"].available


def test_auto_on_cpu_is_a_cpu_path():
    dev = torch.device("cpu")
    cpu_or_torch = "cpu" if fq.backends()["cpu"].available else "torch"
    assert _dispatch.resolve("attention_varlen", "auto", dev) == cpu_or_torch
    assert _dispatch.resolve("attention_with_kvcache", "auto", dev, ("torch",)) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_unavailable_backend_raises_instead_of_falling_back():
    q = torch.randn(1, 2, 2, 16)
    with pytest.raises(RuntimeError, match="unavailable"):
        fq.attention_with_kvcache(
            q,
            torch.randn(1, 4, 2, 16),
            torch.randn(1, 4, 2, 16),
            torch.tensor([1], dtype=torch.int32),
            backend="cuda",
        )


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if fq.backends()["triton"].available:
        with pytest.raises(ValueError, match="cannot run"):
            _dispatch.resolve("attention", "triton", torch.device("cpu"))


def test_import_survives_a_missing_extension():
    code = (
        "import sys; sys.modules['flashquant._C'] = None\n"  # makes 'import flashquant._C' fail
        "import torch, flashquant as fq\n"
        "info = fq.backends()['cpu']\n"
        "assert not info.available and 'could not be loaded' in info.reason, info\n"
        "q = torch.randn(1, 3, 2, 8)\n"
        "print(fq.attention(q, q, q).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_auto_fallback_to_the_slow_path_is_logged_once(caplog, monkeypatch):
    """Without the C++ extension, quant_matmul on a CPU falls back to dequantize + F.linear: loudly, once."""
    info = dict(_dispatch.backends())
    info["cpu"] = dataclasses.replace(info["cpu"], available=False, reason="flashquant._C failed to import")
    monkeypatch.setattr(_dispatch, "_availability", lambda: info)
    _dispatch.warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="flashquant"):
        for _ in range(3):
            assert _dispatch.resolve("quant_matmul", "auto", torch.device("cpu"), ("cpu", "torch")) == "torch"
    msgs = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(msgs) == 1 and "quant_matmul" in msgs[0] and "_C failed to import" in msgs[0]


def test_pytorch_attention_on_cpu_is_the_plan_not_a_fallback(caplog):
    """Prefill-sized attention and varlen attention (more query tokens than the C++ kernel takes): auto picks SDPA
    there, the plan rather than a fallback, without a warning."""
    _dispatch.warn_once.cache_clear()
    q = torch.randn(1, 64, 4, 16)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    with caplog.at_level("WARNING", logger="flashquant"):
        fq.attention(q, q[:, :, :2], q[:, :, :2], causal=True)
        fq.attention_varlen(q[0], q[0, :, :2], q[0, :, :2], cu, cu, 64, 64, causal=True)
    assert not [r for r in caplog.records if "falling back" in r.getMessage()]


def test_cli_check_runs_every_op_against_its_reference():
    out = subprocess.run([sys.executable, "-m", "flashquant"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    from flashquant._dispatch import OPS

    for op in set(OPS) - {"append_kv"}:  # append_kv has no reference; attention_with_kvcache runs it
        assert re.search(rf"^  {op} +torch +\S+ ok$", out.stdout, re.M), (op, out.stdout)
    assert "MISMATCH" not in out.stdout and " ok" in out.stdout


def test_kvcache_auto_order_tries_the_cuda_decode_kernel_first_where_it_applies():
    """On CUDA tensors auto tries the compiled decode kernel, then Triton, then torch; on CPU tensors the C++ kernel
    (decode-sized Sq), then torch."""
    from flashquant.attention import _kvcache_auto_order

    cuda = torch.device("cuda")
    assert _kvcache_auto_order(cuda, True, 1, torch.bfloat16, 128) == ("cuda", "triton", "torch")
    assert _kvcache_auto_order(cuda, False, 1, torch.bfloat16, 128) == ("triton", "torch")
    assert _kvcache_auto_order(torch.device("cpu"), True, 1, torch.bfloat16, 128) == ("cpu", "torch")


def test_available_is_marked_constant_the_way_torch_compile_reads_it():
    """_dispatch marks _available as torch.compiler.assume_constant_result would, without importing torch._dynamo:
    the real decorator must set exactly that attribute (the fullgraph compile tests check the effect)."""

    def probe():
        return 0

    assert torch.compiler.assume_constant_result(probe) is probe
    assert vars(probe) == {"_dynamo_marked_constant": True}
    assert _dispatch._available._dynamo_marked_constant is True


def test_import_flashquant_leaves_torch_dynamo_unimported():
    """torch._dynamo (and the triton it imports) cost ~1 s at start-up: flashquant defers them to first use. In
    the same fresh process (nothing probed or cached yet), a fullgraph compile still treats _available as a
    constant: without the mark, dynamo traces into the backend probe and fails."""
    code = (
        "import sys, torch; before = 'torch._dynamo' in sys.modules; import flashquant as fq; "
        "print(before, 'torch._dynamo' in sys.modules); qw = fq.quantize(torch.randn(16, 64), 8, -1); "
        "f = torch.compile(lambda x: fq.quant_matmul(x, qw), fullgraph=True, backend='eager'); "
        "print(tuple(f(torch.randn(3, 64)).shape))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[1] == "(3, 16)"
    if lines[0].startswith("True"):
        pytest.skip("this torch imports torch._dynamo itself")
    assert lines[0] == "False False"
