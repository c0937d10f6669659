"""Input validation shared by the public ops: errors name the argument, what it got and what it needs.

The checks run on every call of a public op, at decode sizes once per layer and token, between kernels that evict
the interpreter's code and data from the caches: their passing cases take the fewest Python steps (bench/NOTES.md,
"Session 29")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dt(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str, t, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)} ({t.dim()}-D)")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(
            f"{name} must have dtype in ({_dt(dtypes)}), got {str(t.dtype).replace('torch.', '')}"
        )


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """`expected` may hold None for "any size"; `what` explains the symbols, e.g. "(B, Sk, Hkv, D)"."""
    shape = t.shape
    if shape == expected:  # no "any size" entries: one comparison (a torch.Size compares as a tuple)
        return
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        want = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {what or want} = {want}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    device = None
    for t in tensors.values():
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                break
    else:
        if device is not None:
            return device
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")
    return next(iter(devices))


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1), got strides {tuple(t.stride())}; "
            f"call .contiguous() first"
        )


def check_window(window_size) -> tuple[int, int]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded, got {window_size!r}")
    return left, right
