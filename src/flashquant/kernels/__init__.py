"""Triton kernels (imported lazily by the dispatch, so a machine without triton still imports flashquant)."""
