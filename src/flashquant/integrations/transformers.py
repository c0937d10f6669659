"""Hugging Face transformers integration.

    import flashquant.integrations.transformers as fqt
    name = fqt.register()                            # adds attn_implementation="fq"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
    fqt.quantize_transformers_model(model, bits=4)   # linears -> QuantLinear, lm_head kept

The attention function receives transformers' (B, H, S, D) tensors and calls flashquant.attention with
bottom-right-aligned causal masking. The mask function registered with it is transformers' SDPA one: it
returns None when the mask is plain causal (the fused kernel applies it) and a boolean mask otherwise (padding,
custom patterns), which the fused kernels cannot take, so those calls go through PyTorch SDPA with the mask
(logged once) rather than silently dropping it.

Why "fq" and not "flashquant": transformers (5.x) treats every attn_implementation whose name contains "flash"
as a flash-attn kernel to import from its hub (`is_flash_attention_requested`), so a name with "flash" in it
fails at model set-up; "fq" avoids that.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

import flashquant as fq
from flashquant.nn import quantize_model

log = logging.getLogger("flashquant")
NAME = "fq"


@functools.cache
def _log_masked_fallback():
    log.info("flashquant attention: explicit attention mask (padding or custom pattern) -> PyTorch SDPA path")


def flashquant_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers attention interface: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None)."""
    if dropout:
        raise ValueError("flashquant attention is inference-only: dropout must be 0")
    if attention_mask is not None:
        _log_masked_fallback()
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        )
        return out.transpose(1, 2).contiguous(), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = getattr(module, "sliding_window", None)
    out = fq.attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=bool(causal),
        softmax_scale=scaling,
        window_size=(window - 1, 0) if window else (-1, -1),
        softcap=float(getattr(module, "attn_logit_softcapping", None) or 0.0),
    )
    return out, None


def register() -> str:
    """Register attn_implementation="fq" (attention + matching mask function) with transformers; returns the
    name to pass as attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, flashquant_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def quantize_transformers_model(
    model, bits: int = 4, group_size: int = 128, symmetric: bool = True, skip=("lm_head",)
):
    """Swap a loaded transformers model's nn.Linear layers for QuantLinear (lm_head kept by default)."""
    return quantize_model(model, bits=bits, group_size=group_size, symmetric=symmetric, skip=skip)
