"""Triton kernels (imported lazily by the dispatch, so a machine without triton still imports flashquant)."""

import functools

import torch


@functools.cache
def num_sms(device: torch.device, interpreter_sms: int) -> int:
    """Streaming multiprocessors of `device`, used to size split-K / split-KV grids. Under the Triton
    interpreter (CPU tensors) the caller's small stand-in is returned, so the tests exercise the split paths."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return interpreter_sms


def min_group_size(bits: int) -> int:
    """The Triton quantized matmul takes group sizes that are multiples of this, or one group per channel: a
    K tile never straddles a group and each tl.dot needs K >= 16 (int4 splits its tile into even/odd halves)."""
    return 32 if bits == 4 else 16
