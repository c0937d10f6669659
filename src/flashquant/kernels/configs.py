"""Launch configs of the Triton kernels: built-in defaults, overridden per device by tuned tables.

A table is a JSON file named after the device (``NVIDIA_H100_80GB_HBM3.json``) written by
``python -m flashquant tune`` on that device. Tables are looked up, later ones winning key by key, in

1. ``flashquant/kernels/tuned/`` (tables shipped with the package, committed from a tuning run),
2. ``$XDG_CACHE_HOME/flashquant/configs`` (default ``~/.cache/flashquant/configs``; where ``tune`` writes),
3. ``$FLASHQUANT_CONFIG_DIR`` if set.

Keys name a kernel, a regime and a shape bucket, so a config is chosen per bucket, never re-tuned per
sequence length:

* ``attention.prefill.d{64,128,256}``  -> (BLOCK_M, BLOCK_N, num_warps, num_stages)  many rows per KV head
* ``attention.decode.d{64,128,256}``   -> (BLOCK_N, num_warps, num_stages)           <= 64 rows (BLOCK_M = rows)
* ``quant_matmul.int{4,8}.m{16,64,big}`` -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)  by M bucket

Files are read once per device (lazily, on the first launch), not at import.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger("flashquant")

# Defaults: starting points from the FlashAttention-2 / Triton-tutorial (attention) and gemlite/Marlin-style
# (quantized matmul) settings for sm80/sm90; not tuned on a real GPU in this repository.
DEFAULTS: dict[str, tuple[int, ...]] = {
    "attention.prefill.d64": (128, 64, 4, 3),
    "attention.prefill.d128": (128, 64, 8, 3),
    "attention.prefill.d256": (64, 32, 4, 2),
    "attention.decode.d64": (64, 4, 2),
    "attention.decode.d128": (64, 4, 2),
    "attention.decode.d256": (32, 4, 2),
    **{
        f"quant_matmul.int{bits}.{bucket}": cfg
        for bits in (4, 8)
        for bucket, cfg in (
            ("m16", (16, 64, 128, 4, 4)),
            ("m64", (64, 64, 64, 4, 3)),
            ("mbig", (128, 128, 64, 8, 3)),
        )
    },
}
# Devices with less shared memory per block than this (sm_86/sm_89/sm_120: A10, L4, RTX 30xx-50xx; 99 KB) cannot
# fit every default above; these replace them there. `python -m flashquant compile-check --arch 89` checks that
# every default fits both classes.
SMALL_SMEM_BYTES = 160 * 1024
SMALL_SMEM_DEFAULTS: dict[str, tuple[int, ...]] = {
    "attention.prefill.d128": (128, 64, 8, 2),  # 3 stages need 112 KB
}
PACKAGE_DIR = Path(__file__).with_name("tuned")
INTERPRETER_KEY = "triton_interpreter"


def head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def m_bucket(m: int) -> str:
    return "m16" if m <= 16 else "m64" if m <= 64 else "mbig"


def defaults(smem_per_block: int | None = None) -> dict[str, tuple[int, ...]]:
    """The built-in configs for a device with `smem_per_block` bytes of opt-in shared memory per block
    (None: the interpreter, or a device with plenty)."""
    if smem_per_block is not None and smem_per_block < SMALL_SMEM_BYTES:
        return {**DEFAULTS, **SMALL_SMEM_DEFAULTS}
    return dict(DEFAULTS)


def device_smem(device: torch.device) -> int | None:
    """Opt-in shared memory per block of a CUDA device (None for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if smem is None:  # older torch: sm_80 / sm_90 / sm_100 have >= 163 KB, the other parts ~99 KB or less
        smem = 163 * 1024 if (props.major, props.minor) in ((8, 0), (9, 0), (10, 0)) else 99 * 1024
    return smem


def device_key(device: torch.device) -> str:
    """File-name-safe device name (``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3``); CPU tensors run
    under the Triton interpreter, whose table is ``triton_interpreter``."""
    if device.type != "cuda":
        return INTERPRETER_KEY
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def user_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashquant" / "configs"


def search_dirs() -> list[Path]:
    dirs = [PACKAGE_DIR, user_dir()]
    if os.environ.get("FLASHQUANT_CONFIG_DIR"):
        dirs.append(Path(os.environ["FLASHQUANT_CONFIG_DIR"]))
    return dirs


def _valid(key: str, cfg) -> bool:
    default = DEFAULTS.get(key)
    return (
        default is not None
        and isinstance(cfg, list | tuple)
        and len(cfg) == len(default)
        and all(isinstance(c, int) and c > 0 for c in cfg)
    )


@functools.cache
def table(key: str, smem_per_block: int | None = None) -> dict[str, tuple[int, ...]]:
    """The merged config table of the device `key` (see the module docstring for the search order) over the
    defaults for its shared memory."""
    merged = defaults(smem_per_block)
    sources = []
    for d in search_dirs():
        path = d / f"{key}.json"
        if not path.is_file():
            continue
        try:
            entries = json.loads(path.read_text())["configs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("flashquant: ignoring the unreadable launch-config table %s (%s)", path, e)
            continue
        for name, entry in entries.items():
            if isinstance(entry, dict) and "config" not in entry:
                continue  # a key the tuner could not tune (every candidate failed): the default stays
            cfg = entry.get("config") if isinstance(entry, dict) else entry
            if _valid(name, cfg):
                merged[name] = tuple(cfg)
            else:
                logger.warning("flashquant: ignoring launch config %s=%r in %s", name, cfg, path)
        sources.append(str(path))
    if key != INTERPRETER_KEY:
        if sources:
            logger.info("flashquant: launch configs for %s from %s", key, ", ".join(sources))
        else:
            logger.info(
                "flashquant: no tuned launch configs for %s; using the defaults (`python -m flashquant tune` "
                "measures and writes a table for this device)",
                key,
            )
    return merged


@functools.cache
def _device_cached(device_type: str, index: int | None) -> tuple[str, int | None]:
    device = torch.device(device_type, index)
    return device_key(device), device_smem(device)


def lookup(device: torch.device, name: str) -> tuple[int, ...]:
    """The launch config `name` (a key of DEFAULTS) for `device`."""
    return table(*_device_cached(device.type, device.index))[name]


def describe(device: torch.device) -> str:
    """Where `device`'s launch configs come from, for `python -m flashquant`."""
    key, smem = device_key(device), device_smem(device)
    files = [str(d / f"{key}.json") for d in search_dirs() if (d / f"{key}.json").is_file()]
    tuned = sum(table(key, smem)[name] != cfg for name, cfg in defaults(smem).items())
    if not files:
        return f"{key}: built-in defaults (untuned; `python -m flashquant tune` measures this device's)"
    return f"{key}: {tuned} of {len(DEFAULTS)} keys differ from the defaults, from {', '.join(files)}"


def clear_cache() -> None:
    """Forget the loaded tables (after writing a new one, or in tests)."""
    table.cache_clear()
    _device_cached.cache_clear()
