"""``QuantLinear`` and ``quantize_model``: drop-in int4/int8 weight-only replacements for ``nn.Linear``."""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from .quant import QuantizedWeight, quant_matmul, quantize

__all__ = ["QuantLinear", "quantize_model"]
log = logging.getLogger("flashquant")


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with W stored as int4/int8 codes + group scales (see QuantizedWeight).

    Buffers (all in the state_dict): ``qdata`` uint8, ``scales``, ``zeros`` (asymmetric only) and ``bias``.
    Build it with :meth:`from_linear`, or construct an empty one and ``load_state_dict``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        dtype: torch.dtype = torch.float16,
        device=None,
        backend: str = "auto",
    ):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        gs = in_features if group_size == -1 else group_size
        if gs <= 0 or in_features % gs != 0:
            raise ValueError(f"group_size={group_size} must divide in_features={in_features} (or be -1)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.weight_dtype = bits, group_size, symmetric, dtype
        self.backend = backend
        per_byte = 2 if bits == 4 else 1
        self.register_buffer(
            "qdata", torch.zeros(out_features, in_features // per_byte, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales", torch.ones(out_features, in_features // gs, dtype=dtype, device=device)
        )
        zeros = (
            None
            if symmetric
            else torch.zeros(out_features, in_features // gs, dtype=torch.uint8, device=device)
        )
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        backend: str = "auto",
    ) -> QuantLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        qw = quantize(w, bits=bits, group_size=group_size, symmetric=symmetric)
        mod = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits,
            group_size,
            symmetric,
            w.dtype,
            w.device,
            backend,
        )
        mod.qdata.copy_(qw.qdata)
        mod.scales.copy_(qw.scales)
        if qw.zeros is not None:
            mod.zeros.copy_(qw.zeros)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.qdata,
            self.scales,
            self.zeros,
            self.bits,
            self.group_size,
            (self.out_features, self.in_features),
            self.weight_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return quant_matmul(x, self.qweight, bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
        )


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    skip=("lm_head",),
    backend: str = "auto",
) -> nn.Module:
    """Replace every ``nn.Linear`` in `model` (in place) by a :class:`QuantLinear`, except those whose
    qualified name matches a pattern in `skip` (fnmatch patterns, or plain names matched against the last
    component). Linears whose in_features the format cannot hold (group_size does not divide it, odd K for
    int4) are left in floating point and logged. Returns the model."""
    if isinstance(skip, str):
        skip = (skip,)
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or leaf == p for p in skip):
            continue
        gs = mod.in_features if group_size == -1 else group_size
        if mod.in_features % gs or (bits == 4 and mod.in_features % 2):
            log.info(
                "quantize_model: keeping %s in floating point (in_features=%d, group_size=%d)",
                name,
                mod.in_features,
                group_size,
            )
            continue
        targets.append(name)
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent, leaf, QuantLinear.from_linear(getattr(parent, leaf), bits, group_size, symmetric, backend)
        )
    return model
