"""Count the kernels one model step launches, without a GPU: at decode sizes a layer's small ops cost their launch
count, not their bytes, so this is the number to keep down (and a hidden copy or host sync shows up here first).

What counts as one launch: each ATen op that computes something (views, ``empty`` and other metadata-only ops do
not launch kernels and are skipped), each flashquant C++ op (the CPU or CUDA GEMV: on CUDA it is a memset of its
split-K counters plus the kernel, counted as one here) and each Triton kernel launch (ATen ops inside a launch,
which the interpreter makes, are not counted). Host syncs (``.item()``, ``.tolist()``) are counted apart.

``python -m flashquant.bench.launches`` prints launches per decoder layer for the plain-PyTorch model and for
flashquant's (fused projections, fused layer ops, Triton KV-cache append), on a tiny Llama config, under the
Triton interpreter.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that allocate or re-describe memory without a kernel.
_NO_KERNEL = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::lift_fresh",
    "aten::detach",
    "aten::detach_",
    "aten::alias",
    "aten::_reshape_alias",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
    "aten::sym_storage_offset",
    "aten::is_same_size",
    "flashquant::cpu_simd_level",  # a query of the C++ extension (the first backends() call)
}
_HOST_SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero"}


def _aliases_an_input(out, args, kwargs) -> bool:
    def storages(obj):
        leaves = pytree.tree_leaves(obj)
        return {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}

    return bool(storages(out) & storages((args, kwargs))) or not storages(out)


class LaunchCounter(TorchDispatchMode):
    """Counts launches by name while active (a context manager). ``counts``: name -> launches; ``syncs``:
    host-sync op name -> count."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self._in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if self._in_kernel:
            return out
        if name in _HOST_SYNC:
            self.syncs[name] += 1
        elif name not in _NO_KERNEL and not (func.is_view and _aliases_an_input(out, args, kwargs)):
            # (in inference mode composite ops such as aten::to and aten::contiguous arrive whole, marked as
            # views because they may return their input; they launch a copy when they do not)
            self.counts[name] += 1
        return out

    @contextlib.contextmanager
    def _triton_launches(self):
        from triton.runtime.jit import KernelInterface

        original = KernelInterface.__getitem__
        counter = self

        def counted(kernel, grid):
            launch = original(kernel, grid)

            def run(*args, **kwargs):
                counter.counts[f"triton::{kernel.__name__}"] += 1
                counter._in_kernel += 1
                try:
                    return launch(*args, **kwargs)
                finally:
                    counter._in_kernel -= 1

            return run

        KernelInterface.__getitem__ = counted
        try:
            yield
        finally:
            KernelInterface.__getitem__ = original

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._triton_launches())
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_launches(fn: Callable[[], object]) -> LaunchCounter:
    """Run `fn` once with launches counted."""
    with LaunchCounter() as counter, torch.inference_mode():
        fn()
    return counter


def decode_launches(build: Callable[[int], torch.nn.Module], cache_dtype=torch.float32, device="cpu") -> dict:
    """Launches of one decode step (batch 2, after a 5-token prefill) per decoder layer and outside the layers:
    the step is counted for models of 1 and 2 layers (`build(num_layers)`), and the difference is one layer.
    Returns {"per_layer": {name: n}, "per_layer_total", "outside_layers_total", "host_syncs_per_layer"}."""
    from ..models.llama import KVCache

    counters = []
    for layers in (1, 2):
        model = build(layers)
        cache = KVCache(model.cfg, 2, 16, cache_dtype, device)
        tokens = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(device)
        with torch.inference_mode():
            model(tokens[:, :5], cache=cache)
        cache.advance([5, 5])
        counters.append(count_launches(lambda m=model, c=cache, t=tokens[:, 5:]: m(t, cache=c)))
    one, two = counters
    per_layer = {k: two.counts[k] - one.counts[k] for k in two.counts | one.counts}
    per_layer = {k: v for k, v in sorted(per_layer.items()) if v}
    return {
        "per_layer": per_layer,
        "per_layer_total": two.total - one.total,
        "outside_layers_total": 2 * one.total - two.total,
        "host_syncs_per_layer": sum(two.syncs.values()) - sum(one.syncs.values()),
    }


def llama_builder(
    flashquant_ops: bool, quant, dtype=torch.float16, device="cpu"
) -> Callable[[int], torch.nn.Module]:
    """The demo's two kinds of model at the tiny config: PyTorch ops and separate linears ("torch" backend), or
    flashquant's (Triton kernels, run by the interpreter on a CPU; fused projections); `quant`: (bits, group)."""
    from ..models.llama import Llama, config_from_preset

    def build(num_layers: int):
        cfg = config_from_preset("tiny", num_layers=num_layers)
        backend = "triton" if flashquant_ops else "torch"
        model = Llama.random(cfg, seed=0, dtype=dtype, device=device, attn_backend=backend)
        if quant:
            model.quantize(*quant, skip=())
        if flashquant_ops:
            model.fuse_projections()
        return model

    return build


def main(argv=None) -> int:
    import argparse
    import json
    import os
    import sys

    ap = argparse.ArgumentParser(
        description="Kernel launches per decoder layer at decode, counted on the CPU."
    )
    ap.add_argument("--json", help="also write the counts, with the environment and commit, to this file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it at import, which has happened: re-exec
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "flashquant.bench.launches", *sys.argv[1:]], env)
    print("Kernel launches per decoder layer, one decode step (tiny Llama config, fp16, batch 2; CPU).")
    print("flashquant's GEMV is one launch here; on CUDA add its split-K counter memset (+1 per linear).\n")
    rows = {}
    for title, build in [
        ("PyTorch model (Hugging Face forms, separate linears), fp16", llama_builder(False, None)),
        ("flashquant model (fused projections and layer ops, Triton), int4", llama_builder(True, (4, 32))),
    ]:
        r = rows[title] = decode_launches(build, torch.float16)
        print(f"{title}: {r['per_layer_total']} per layer, {r['outside_layers_total']} outside the layers, "
              f"{r['host_syncs_per_layer']} host syncs per layer")  # fmt: skip
        for name, n in r["per_layer"].items():
            print(f"  {n:3d}  {name}")
    if args.json:
        from .harness import environment

        with open(args.json, "w") as f:
            json.dump({"environment": environment("cpu"), "models": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
