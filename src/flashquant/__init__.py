"""flashquant: fused GQA attention and int4/int8 weight-only quantized matmul for Llama-style LLMs.

Public API: :func:`attention`, :func:`attention_varlen`, :func:`attention_with_kvcache`, :func:`quantize`,
:class:`QuantizedWeight`, :func:`quant_matmul`, the fused layer ops :func:`rms_norm`, :func:`rotary_embedding`
and :func:`silu_mul`, :mod:`flashquant.nn` (``QuantLinear``, ``quantize_model``), and :func:`backends` (what
can run on this machine, and why not).
"""

from . import _ext, nn
from ._dispatch import backends
from .attention import attention, attention_varlen, attention_with_kvcache
from .layer_ops import rms_norm, rotary_embedding, silu_mul
from .quant import QuantizedWeight, quant_matmul, quantize

__version__ = "0.1.0"

# Register the C++ op schemas (torch.ops.flashquant.*) if the extensions are built; failures are recorded
# and reported by backends(), never raised here.
_ext.cpu_ext()
_ext.cuda_ext()

__all__ = [
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "quantize",
    "QuantizedWeight",
    "quant_matmul",
    "rms_norm",
    "rotary_embedding",
    "silu_mul",
    "backends",
    "nn",
]
