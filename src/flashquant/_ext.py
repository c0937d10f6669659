"""Loads the compiled extensions on first use and remembers why one is missing.

A missing or broken extension never breaks ``import flashquant``: the PyTorch paths still work and
``flashquant.backends()`` reports the reason.
"""

from __future__ import annotations

import functools
import importlib


@functools.cache
def load(name: str) -> tuple[bool, str]:
    """Import ``flashquant.<name>`` (which registers its ops with torch.ops.flashquant). Returns (ok, reason)."""
    try:
        importlib.import_module(f"flashquant.{name}")
    except Exception as e:  # ImportError, or an undefined-symbol OSError from an ABI mismatch
        return False, f"flashquant.{name} could not be loaded ({type(e).__name__}: {e})"
    return True, "loaded"


def cpu_ext() -> tuple[bool, str]:
    ok, why = load("_C")
    if ok:
        load("_fakes")  # fake impls for the C++ schemas (needs the schemas registered first)
    return ok, why


def cuda_ext() -> tuple[bool, str]:
    ok, why = load("_C")  # the CUDA extension implements schemas that _C defines
    if not ok:
        return ok, why
    return load("_C_cuda")
