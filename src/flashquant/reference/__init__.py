"""Pure-PyTorch fp32 references: deliberately simple, no tricks. They define correctness for every kernel
and import nothing from the kernels."""

from .attention import attention_kvcache_ref, attention_ref, attention_varlen_ref
from .layers import rms_norm_ref, rotary_ref, silu_mul_ref
from .quant import dequantize_ref, quant_matmul_ref, quantize_ref

__all__ = [
    "attention_ref",
    "attention_varlen_ref",
    "attention_kvcache_ref",
    "quantize_ref",
    "dequantize_ref",
    "quant_matmul_ref",
    "rms_norm_ref",
    "rotary_ref",
    "silu_mul_ref",
]
