"""The one place that decides which implementation runs.

Every public op calls :func:`resolve` with the backend the user asked for (``"auto"`` or a name) and the
device of its tensors. Naming a backend that is unavailable raises; ``"auto"`` picks the fastest available
implementation and logs (once) when it has to fall back to a slow path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch

from . import _ext

log = logging.getLogger("flashquant")

BACKENDS = ("reference", "torch", "triton", "cuda", "cpu")

# Which backends implement which op.
OPS: dict[str, tuple[str, ...]] = {
    "attention": ("reference", "torch", "triton", "cpu"),
    "attention_varlen": ("reference", "torch", "triton", "cpu"),
    "attention_with_kvcache": ("reference", "torch", "triton", "cuda", "cpu"),
    "quant_matmul": ("reference", "torch", "triton", "cuda", "cpu"),
    # "reference": fp32, one rounding; "torch": the PyTorch ops a user would write (layer_ops.py).
    "rms_norm": ("reference", "torch", "triton", "cpu"),
    "rotary_embedding": ("reference", "torch", "triton", "cpu"),
    "silu_mul": ("reference", "torch", "triton", "cpu"),
    # KV-cache writes: PyTorch indexing, one Triton kernel, a C++ row copy
    "append_kv": ("torch", "triton", "cpu"),
}

# Ops whose custom op has a backward registered with torch.library.register_autograd (quant.py: w.r.t. x and bias).
HAS_BACKWARD = ("quant_matmul",)

# Which backends give gradients when an op's inputs require them: every backend of an op in HAS_BACKWARD; else
# only the "torch" and "reference" paths, PyTorch ops that autograd differentiates (the fused attention and layer
# kernels are forward-only). append_kv writes caches and has no gradient.
DIFFERENTIABLE: dict[str, tuple[str, ...]] = {
    op: OPS[op] if op in HAS_BACKWARD else ("reference", "torch") for op in OPS if op != "append_kv"
}


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these inputs: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    available: bool
    reason: str
    devices: tuple[str, ...]

    def __str__(self) -> str:
        return f"{'yes' if self.available else 'no '}  [{', '.join(self.devices)}]  {self.reason}"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if triton_interpret():
        return (
            True,
            f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1): CPU tensors, slow",
        )
    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__} is installed but no CUDA device is visible"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def backends() -> dict[str, BackendInfo]:
    """What can run on this machine, and why not where it cannot."""
    cpu_ok, cpu_why = _ext.cpu_ext()
    if cpu_ok:
        cpu_why = f"C++ extension loaded, SIMD: {torch.ops.flashquant.cpu_simd_level()}"
    cuda_ok, cuda_why = _ext.cuda_ext()
    if cuda_ok and not torch.cuda.is_available():
        cuda_ok, cuda_why = False, "CUDA extension built but no CUDA device is visible"
    elif not cuda_ok and torch.version.cuda is None:
        cuda_why = f"this torch ({torch.__version__}) is a CPU build; the CUDA extension was not built"
    tri_ok, tri_why = _triton_status()
    tri_devices = ("cpu (interpreter)",) if triton_interpret() else ("cuda",)
    return {
        "reference": BackendInfo(True, "pure PyTorch, fp32 (the correctness oracle; slow)", ("cpu", "cuda")),
        "torch": BackendInfo(True, "PyTorch ops (SDPA, dequantize + F.linear)", ("cpu", "cuda")),
        "triton": BackendInfo(tri_ok, tri_why, tri_devices),
        "cuda": BackendInfo(cuda_ok, cuda_why if not cuda_ok else "CUDA extension loaded", ("cuda",)),
        "cpu": BackendInfo(cpu_ok, cpu_why, ("cpu",)),
    }


def _constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does (it sets this one attribute; tests/test_dispatch.py
    checks that against the installed torch), without its ``import torch._dynamo``, the bulk of import time."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile  # evaluated once at trace time, not traced (it imports extensions)
def _available(name: str) -> bool:
    return _availability()[name].available


@functools.cache
def _availability() -> dict[str, BackendInfo]:
    return backends()


@functools.cache
def warn_once(msg: str) -> None:
    log.warning(msg)


def resolve(
    op: str,
    backend: str,
    device: torch.device,
    auto_order: tuple[str, ...] | None = None,
    grad: bool = False,
) -> str:
    """Return the concrete backend name for `op` on `device`.

    `auto_order` is the op's own preference list for "auto" on this device and shape (fastest first); the
    first available one wins. `grad` (see :func:`needs_grad`): the inputs require gradients, so only a backend
    in DIFFERENTIABLE[op] may run; "auto" then skips forward-only kernels (saying so once), a named forward-only
    backend raises.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    supported = OPS[op]
    if grad and backend != "auto" and backend in supported and backend not in DIFFERENTIABLE[op]:
        raise ValueError(
            f"backend={backend!r} runs flashquant.{op} forward only (no backward), but its inputs require grad; "
            f"call it under torch.no_grad() or torch.inference_mode(), detach the inputs, or pick a backend with "
            f"a backward: {DIFFERENTIABLE[op]}"
        )
    if backend == "auto":
        if auto_order is None:
            auto_order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        if grad:
            skipped = [
                b
                for b in auto_order
                if b in supported and b not in DIFFERENTIABLE[op] and _available(b) and _device_ok(b, device)
            ]
            auto_order = tuple(b for b in auto_order if b in DIFFERENTIABLE[op]) or ("torch",)
            if skipped and not torch.compiler.is_compiling():
                warn_once(
                    f"flashquant.{op}: the inputs require grad and the {', '.join(skipped)} "
                    f"kernel{'s are' if len(skipped) > 1 else ' is'} forward-only; "
                    "using the PyTorch path, which has a backward (run inference under torch.no_grad() or "
                    "torch.inference_mode() to get the kernel)"
                )
        for name in auto_order:
            if name in supported and _available(name) and _device_ok(name, device):
                break
        else:
            name = "torch"
        if name == "torch" and auto_order[0] != "torch" and not torch.compiler.is_compiling():
            # A kernel this op has for this device type was wanted but cannot run here: say so once instead of
            # hiding a large slowdown. With no such kernel (attention on a CPU) the PyTorch path is the plan.
            wanted = [b for b in auto_order if b != "torch" and b in supported and _device_ok(b, device)]
            if wanted:
                missing = ", ".join(f"{b} ({_availability()[b].reason})" for b in wanted)
                warn_once(
                    f"flashquant.{op} on {device.type}: falling back to the PyTorch path; unavailable: {missing}"
                )
        return name
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in supported:
        raise ValueError(f"backend={backend!r} does not implement flashquant.{op}; it has {supported}")
    if not _available(backend):
        why = _availability()[backend].reason
        raise RuntimeError(f"backend={backend!r} was requested for flashquant.{op} but is unavailable: {why}")
    if not _device_ok(backend, device):
        raise ValueError(
            f"backend={backend!r} cannot run flashquant.{op} on {device.type} tensors "
            f"(it runs on: {', '.join(backends()[backend].devices)})"
        )
    return backend


def _device_ok(name: str, device: torch.device) -> bool:
    if name == "cuda":
        return device.type == "cuda"
    if name == "cpu":
        return device.type == "cpu"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return True


def call(op: str, impl, *args, grad: bool = False):
    """Run a public op's implementation. Under torch.compile the registered custom op
    (torch.ops.flashquant.<op>) is called so it is traced as one node; in eager mode the implementation is
    called directly, skipping ~45 us of custom-op wrapper overhead per call (it matters at decode sizes).
    With `grad` (the inputs require gradients): ops whose custom op carries a registered backward
    (quant_matmul) go through it, eager or compiled; the others' differentiable backends are PyTorch ops, called
    directly so that autograd (or torch.compile) traces into them."""
    if grad:
        return getattr(torch.ops.flashquant, op)(*args) if op in HAS_BACKWARD else impl(*args)
    if torch.compiler.is_compiling():
        return getattr(torch.ops.flashquant, op)(*args)
    return impl(*args)
